"""Command line: `selfimprove run | eval | report | compare | trace | serve | prepare | list`.

    selfimprove run pipelines/star_arithmetic.yaml [key.sub=value ...] [--check]   (or a shipped name: star_arithmetic)
    selfimprove eval --model smollm2-135m-instruct --task gsm8k --num-problems 200
    selfimprove report runs/star_arithmetic
    selfimprove compare runs/star_arithmetic runs/grpo_arithmetic --out compare.html
    selfimprove trace runs/star_arithmetic r001/generate/add-train-00011/0
    selfimprove serve smollm2-135m-instruct --replicas 2 --port 8100
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from . import serve, shipped
from .config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfimprove", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a pipeline", description=(
        "Run a pipeline YAML for its rounds. Re-running the same command resumes: finished stages are skipped and "
        "an interrupted generation continues from its last saved chunk."))
    run.add_argument("pipeline", help="pipeline YAML or shipped pipeline name, e.g. pipelines/star_arithmetic.yaml, "
                                      "my.yaml, tiny_spin (`selfimprove list` names the shipped ones)")
    run.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. rounds=2 stages.generate.sampling.n=8")
    run.add_argument("--run-dir", help="run directory (default: <runs_dir>/<name>)")
    run.add_argument("--check", action="store_true", help="only load and check the config, then exit")

    ev = sub.add_parser("eval", help="evaluate a model (and optionally an adapter) on a task", description=(
        "Greedy or sampled evaluation with accuracy (strict and flexible), pass@k and maj@k, 95% bootstrap "
        "intervals; every generation is saved beside the metrics. Runs the pipeline's own evaluate stage; "
        "unset options take the pipeline's and the evaluate stage's defaults."))
    ev.add_argument("--model", help="registered model name or model folder (default: the pipeline default)")
    ev.add_argument("--adapter", help="PEFT adapter folder trained on --model")
    ev.add_argument("--task", required=True, help="task name (gsm8k, arithmetic, math500, ...)")
    ev.add_argument("--split", help="default: the evaluate stage's")
    ev.add_argument("--num-problems", type=int, help="the first N problems of the split (default: all)")
    ev.add_argument("--k", type=int, default=1, help="samples per problem (k > 1 reports pass@k and maj@k)")
    ev.add_argument("--temperature", type=float, help="default 0 for k=1, 0.7 for k>1")
    ev.add_argument("--max-tokens", type=int, help="default: the sampling default")
    ev.add_argument("--engine", help="vllm or hf (default: the pipeline default)")
    ev.add_argument("--run-dir", help="where generations and metrics go (default runs/eval/<model>-<task>-<hash>)")
    ev.add_argument("overrides", nargs="*", help="extra key=value overrides, e.g. task.prompt_format=fewshot")

    sub.add_parser("report", help="print the per-round table of a run").add_argument("run_dir")

    cmp = sub.add_parser("compare", help="compare finished runs: accuracy curves, config differences, paired test")
    cmp.add_argument("run_dirs", nargs="+")
    cmp.add_argument("--out", help="also write a self-contained HTML page here")

    tr = sub.add_parser("trace", help="follow one sample: its weights, seed, verdicts and where it was used")
    tr.add_argument("run_dir")
    tr.add_argument("sample_id", help="as in the samples' sample_id column, e.g. r001/generate/add-train-00011/0")

    sub.add_parser("prepare", help="prepare a registered model folder (GGUF → safetensors, once)").add_argument("model")

    sub.add_parser("list", help="list shipped pipelines and registered models, tasks, critics, stages, engines, ...")
    serve.add_parser(sub)

    # Overrides may come before or after options: `run X.yaml --check key=value` and `run X.yaml key=value --check`
    # (argparse leaves positionals after an option unparsed when nargs="*" already matched).
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    quiet_libraries()
    from .pipeline import StageFailed

    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def quiet_libraries() -> None:
    """Keep the console to our own progress and tables: vLLM's INFO lines and datasets' save bars drown them."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # torch's C++ notices (e.g. the CPU worker's NUMA binding) bypass Python logging; read when torch loads
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    import datasets

    datasets.disable_progress_bars()


def cmd_run(args) -> int:
    from .pipeline import Runner, load_pipeline

    path = shipped.find(args.pipeline)
    if not path.exists():
        raise ConfigError(f"{args.pipeline}: no such config file here, nor among the shipped files; "
                          f"{shipped.describe()}")
    pipeline = load_pipeline(path, args.overrides)
    if args.check:
        print(f"{args.pipeline}: ok ({len(pipeline.stages)} stages x {pipeline.config.rounds} rounds)")
        return 0
    Runner(pipeline, args.run_dir).run()
    return 0


def cmd_eval(args) -> int:
    from .pipeline import Runner, load_pipeline

    temperature = args.temperature if args.temperature is not None else (0.0 if args.k == 1 else 0.7)
    sampling = {"n": args.k, "temperature": temperature,
                **({"max_tokens": args.max_tokens} if args.max_tokens is not None else {})}
    problems = {"num_problems": args.num_problems, **({"split": args.split} if args.split else {})}
    data = {"rounds": 0, "evaluate_base": True, "adapter": str(Path(args.adapter).resolve()) if args.adapter else None,
            "stages": {"evaluate": {"problems": problems, "sampling": sampling, "weights": "policy"}}}
    data.update({k: v for k, v in (("model", args.model), ("engine", {"name": args.engine}),
                                   ("task", {"name": args.task})) if v and v != {"name": None}})
    data["name"] = "-".join([Path(args.model or "default").name, args.task,
                             *([Path(args.adapter).parent.name] if args.adapter else [])])
    pipeline = load_pipeline(None, args.overrides, data=data)
    # One folder per distinct evaluation, so re-running the same command resumes and a different one never
    # collides with it.
    tag = hashlib.sha256(json.dumps([data, args.overrides], sort_keys=True).encode()).hexdigest()[:8]
    Runner(pipeline, args.run_dir or Path("runs") / "eval" / f"{data['name']}-{tag}").run()
    return 0


def cmd_compare(args) -> int:
    from .compare import main as compare

    return compare(args.run_dirs, args.out)


def cmd_trace(args) -> int:
    from .trace import main as trace

    return trace(args.run_dir, args.sample_id)


def cmd_report(args) -> int:
    from .report_html import write_report

    write_report(args.run_dir)  # prints the table; rewrites report.md and plots/
    return 0


def cmd_prepare(args) -> int:
    from .models import prepare_model

    print(prepare_model(args.model))
    return 0


def cmd_list(args) -> int:
    from .registry import (BASELINES, CRITICS, ENGINES, GRADERS, JUDGE_BACKENDS, MODELS, OBJECTIVES, STAGES, TASKS,
                           TRACKERS, TRAINERS)

    print(f"{'pipelines:':16}", ", ".join(shipped.pipeline_names()))
    for registry in (MODELS, TASKS, GRADERS, CRITICS, STAGES, ENGINES, TRAINERS, OBJECTIVES, BASELINES,
                     JUDGE_BACKENDS, TRACKERS):
        print(f"{registry.kind + 's:':16}", ", ".join(registry.names()))
    return 0


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "report": cmd_report, "compare": cmd_compare, "trace": cmd_trace,
            "prepare": cmd_prepare, "list": cmd_list, "serve": serve.main}

if __name__ == "__main__":
    sys.exit(main())
