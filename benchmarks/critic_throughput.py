"""Answer-check throughput per core, and the critics' share of a real run's rounds.

    .venv/bin/python benchmarks/critic_throughput.py [--samples 4000] [--math-samples 1000] [--run runs/star_arithmetic]

Verdicts per second, in this one process (one core), of the built-in `answer` critic (strict and flexible)
called as the critique stage calls it (`judge` on a list of samples):
- arithmetic: the task's gold scratchpads and the same with a wrong sum, half each;
- GSM8K: train gold solutions (in the "The answer is N." format the prompt asks for) and a wrong variant;
- MATH: train gold solutions (with their `\\boxed{}` answer) and a wrong variant, graded by Math-Verify (parse
  and verify, each under the task's timeout).
With `--run`, it also reads that run's metrics.jsonl and prints, per round, the critique stages' seconds as a
share of the round's stage seconds (the target: under 5%). Nothing here is a pass/fail threshold.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path


def samples_for(task, split: str, n: int) -> list[dict]:
    """Half gold solutions, half wrong ones (the last number of the gold solution changed), 4 per problem."""
    problems = task.problems(split)
    out = []
    for i in range(n):
        p = problems[(i // 4) % len(problems)]  # 4 samples per problem, as a generate stage draws them
        gold = task.reference_solution(p)
        if i % 2:
            answer = p["answer"]
            gold = gold[::-1].replace(answer[::-1], ("9" + answer)[::-1], 1)[::-1] if answer in gold else gold + " 7"
        out.append({**p, "completion": gold})
    return out


def rate(critic, samples: list[dict]) -> tuple[float, float]:
    t = time.perf_counter()
    verdicts = critic.judge(samples)
    seconds = time.perf_counter() - t
    return len(samples) / seconds, sum(bool(v.label) for v in verdicts) / len(verdicts)


def critique_share(run: Path) -> dict[int, float]:
    seconds, critique = defaultdict(float), defaultdict(float)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "stage" not in row or row.get("seconds") is None:
            continue
        seconds[row["round"]] += row["seconds"]
        if row.get("type") == "critique":
            critique[row["round"]] += row["seconds"]
    return {r: critique[r] / s for r, s in sorted(seconds.items()) if s > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4000, help="arithmetic and GSM8K samples each")
    parser.add_argument("--math-samples", type=int, default=1000)
    parser.add_argument("--run", type=Path, default=None, help="a run folder: the critique stages' share per round")
    args = parser.parse_args()

    from selfimprove.critics.answer import AnswerCritic
    from selfimprove.critics.base import CriticContext
    from selfimprove.tasks.arithmetic import Arithmetic
    from selfimprove.tasks.gsm8k import GSM8K
    from selfimprove.tasks.math import MATH

    cases = [("arithmetic", Arithmetic(Arithmetic.Config()), args.samples),
             ("GSM8K", GSM8K(GSM8K.Config()), args.samples),
             ("MATH (Math-Verify)", MATH(MATH.Config()), args.math_samples)]
    print("| task | mode | samples | verdicts/s per core | share judged correct |")
    print("| --- | --- | --- | --- | --- |")
    for name, task, n in cases:
        samples = samples_for(task, "train", n)
        for mode in ("strict", "flexible"):
            critic = AnswerCritic(AnswerCritic.Config(mode=mode), CriticContext(task=task))
            critic.judge(samples[:20])  # first-call costs (imports, regex compilation, Math-Verify's parser)
            per_second, correct = rate(critic, samples)
            print(f"| {name} | {mode} | {n} | {per_second:,.0f} | {correct:.2f} |", flush=True)
    if args.run:
        print(f"\ncritique stages' share of each round's stage seconds in {args.run}:")
        for r, share in critique_share(args.run).items():
            print(f"  round {r}: {share:.2%}")


if __name__ == "__main__":
    main()
