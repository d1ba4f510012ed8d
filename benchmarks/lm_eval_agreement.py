"""Agreement with lm-evaluation-harness: score the same saved generations both ways, side by side.

    .venv/bin/python benchmarks/lm_eval_agreement.py runs/eval/<name>/round_000/evaluate [--tolerance 0.5]

The argument is an evaluate stage's folder (or its `data/` dataset). Its rows hold every generation with
selfimprove's own grades (`correct`, `correct_flexible`); this script regrades the first sample of each problem
(the one `accuracy` reports) with the harness's own code, nothing re-implemented:
- GSM8K: the `gsm8k_cot_zeroshot` task's filters and metric, read from the task YAML shipped in `lm_eval`
  (strict-match: "The answer is N."; flexible-extract: the last number), `RegexFilter` + `TakeFirstFilter`
  and the registered `exact_match` metric with the YAML's arguments, against the original GSM8K answer text
  (`seeds/gsm8k/test.jsonl`, as the harness's `doc_to_target`).
- MATH: `minerva_math`'s `process_results` and its `math_verify` metric (Math-Verify's default extraction over
  the whole completion against the parsed gold solution), compared with selfimprove's flexible accuracy.
  selfimprove's strict accuracy (last `\\boxed{}` only) has no harness counterpart and is shown alone.
It prints both accuracies, their difference in points, and how many problems the two disagree on; the exit
status is 1 when a difference exceeds `--tolerance` points (the target is 0.5).

Needs the `bench` extra: `pip install -e .[bench]` (lm_eval).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def first_samples(path: Path) -> list[dict]:
    from datasets import load_from_disk

    data = path / "data" if (path / "data").exists() else path
    rows = load_from_disk(str(data)).to_list()
    first: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: r["index"]):
        first.setdefault(row["problem_id"], row)
    return list(first.values())


def gsm8k_harness(rows: list[dict]) -> dict[str, list[bool]]:
    """Per row, lm-eval's strict-match and flexible-extract exact_match for gsm8k_cot_zeroshot."""
    import lm_eval
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter
    from lm_eval.filters.selection import TakeFirstFilter

    task = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k-cot-zeroshot.yaml").read_text())
    (metric,) = [m for m in task["metric_list"] if m["metric"] == "exact_match"]
    kwargs = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation") if k in metric}
    seeds = REPO / "selfimprove" / "seeds" / "gsm8k"
    gold_text = [json.loads(line)["answer"] for line in (seeds / "test.jsonl").read_text().splitlines()]
    references = [gold_text[int(r["problem_id"].rsplit("-", 1)[1])] for r in rows]
    out = {}
    for pipeline in task["filter_list"]:
        resps: list = [[r["completion"]] for r in rows]
        for step in pipeline["filter"]:
            args = {k: v for k, v in step.items() if k != "function"}
            f = {"regex": RegexFilter, "take_first": TakeFirstFilter}[step["function"]](**args)
            resps = list(f.apply(resps, rows))
        out[pipeline["name"]] = [bool(exact_match_hf_evaluate(predictions=[p], references=[g], **kwargs)["exact_match"])
                                 for p, g in zip(resps, references)]
    return out


def minerva_utils():
    """lm-eval's minerva_math/utils.py, set up to compute its math_verify metric here.

    The module refuses to import unless antlr4-python3-runtime is 4.11, which sympy's `parse_latex` (behind its
    *exact_match* metric, `is_equiv`) wants; Math-Verify (its *math_verify* metric, the one compared here) runs on
    latex2sympy2_extended, which needs antlr4 4.13. So the module is imported with that one version check
    answered "4.11", and `is_equiv` (which would then raise) is replaced by a stub: `process_results` runs
    unchanged, its math_verify result is the harness's own, and its exact_match (which also needs Minerva's
    "Final Answer: The final answer is" format) is ignored."""
    import importlib.metadata as metadata

    # Imported first, under the real version: latex2sympy2_extended picks its generated ANTLR parser by the
    # installed runtime's version when it is imported.
    import latex2sympy2_extended.latex2sympy2  # noqa: F401
    import math_verify  # noqa: F401

    real = metadata.version
    metadata.version = lambda name: "4.11.0" if name == "antlr4-python3-runtime" else real(name)
    try:
        from lm_eval.tasks.minerva_math import utils
    finally:
        metadata.version = real
    utils.is_equiv = lambda x1, x2: False
    return utils


def math_harness(rows: list[dict]) -> dict[str, list[bool]]:
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    utils = minerva_utils()
    docs = [{"problem": r["question"], "solution": r["solution"],
             "answer": utils.normalize_final_answer(utils.remove_boxed(utils.last_boxed_only_string(r["solution"])))}
            for r in rows]
    return {"math_verify": [bool(utils.process_results(d, [r["completion"]])["math_verify"]) for d, r in zip(docs, rows)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage_dir", type=Path, help="an evaluate stage folder (or its data/ dataset)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="largest acceptable difference, in points")
    args = parser.parse_args(argv)
    rows = first_samples(args.stage_dir)
    if not rows:
        print("no generations found", file=sys.stderr)
        return 2
    kind = rows[0]["problem_id"].split("-", 1)[0]
    if kind == "gsm8k":
        harness = gsm8k_harness(rows)
        pairs = [("strict", "correct", "strict-match"), ("flexible", "correct_flexible", "flexible-extract")]
    elif kind == "math":
        harness = math_harness(rows)
        pairs = [("strict (last \\boxed{})", "correct", None), ("flexible", "correct_flexible", "math_verify")]
    else:
        print(f"unsupported task of problem ids like {rows[0]['problem_id']!r} (gsm8k or MATH)", file=sys.stderr)
        return 2
    n = len(rows)
    print(f"{args.stage_dir}: {kind}, {n} problems (first sample of each)")
    print(f"{'selfimprove':<26} {'acc':>7}   {'lm-eval':<18} {'acc':>7}   {'diff':>6}   disagree")
    worst = 0.0
    for ours_name, column, theirs_name in pairs:
        ours = [bool(r[column]) for r in rows]
        acc = 100 * sum(ours) / n
        if theirs_name is None:
            print(f"{ours_name:<26} {acc:6.2f}%   {'(no counterpart)':<18}")
            continue
        theirs = harness[theirs_name]
        other = 100 * sum(theirs) / n
        disagree = sum(a != b for a, b in zip(ours, theirs))
        worst = max(worst, abs(acc - other))
        print(f"{ours_name:<26} {acc:6.2f}%   {theirs_name:<18} {other:6.2f}%   {acc - other:+6.2f}   {disagree}")
    ok = worst <= args.tolerance
    print(f"largest difference {worst:.2f} points: {'within' if ok else 'OUTSIDE'} the {args.tolerance} point target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
