"""Evaluate: sample the test problems with some weights, grade every sample, report statistics.

Metrics (each with a 95% percentile-bootstrap interval over problems):
- `accuracy` (strict answer format) and `accuracy_flexible` (last number), on the first sample of each
  problem (the greedy one when temperature is 0);
- with n > 1 samples: unbiased `pass@k` for each k in `pass_k` (default 1 and n) and `maj@n`
  (majority vote over extracted answers);
- `by/<column>=<value>/accuracy` for each column in `breakdown` (e.g. digits for arithmetic); an empty
  `breakdown` uses the task's own `breakdown` attribute when it has one (MATH: subject and level).

This is the code `selfimprove eval` runs too (as a pipeline with only this stage).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ..artifacts import save_rows
from ..records import SamplingConfig
from ..metrics import majority_correct, pass_at_k, summarize
from ..registry import STAGES
from .base import Stage
from .rollout import sample_problems


@dataclass
class EvalProblems:
    """Evaluation always takes the first `num_problems` of the split, so every round sees the same problems."""

    split: str = "test"
    num_problems: int | None = None  # None = the whole split


@STAGES.register("evaluate")
class Evaluate(Stage):
    evaluates = True
    @dataclass
    class Config:
        problems: EvalProblems = field(default_factory=EvalProblems)
        sampling: SamplingConfig = field(default_factory=SamplingConfig)
        weights: str = "latest"
        pass_k: list[int] = field(default_factory=list)  # default: [1, n] when n > 1
        breakdown: list[str] = field(default_factory=list)  # problem columns to break accuracy down by; [] = the task's
        bootstrap_resamples: int = 1000
        chunk_size: int = 256  # problems per engine call and per resume point (small chunks starve the batch)

        def __post_init__(self):
            bad = [k for k in self.pass_k if not 1 <= k <= self.sampling.n]
            if bad:
                raise ValueError(f"pass_k {bad} must lie in 1..sampling.n ({self.sampling.n})")

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        problems = ctx.task.problems(c.problems.split)
        if c.problems.num_problems is not None:
            problems = problems[: c.problems.num_problems]
        weights = ctx.weights(c.weights)
        rows = sample_problems(
            engine=ctx.engine, task=ctx.task, problems=problems, sampling=c.sampling, weights=weights, hint=False,
            chunk_size=c.chunk_size, shard_dir=ctx.out_dir / "shards", chunk_seed=lambda i: ctx.seed("chunk", i),
            round_index=ctx.round, stage=ctx.stage,
        )
        for row in rows:
            grade = ctx.task.grade(row, row["completion"])
            row.update(correct=grade.strict, correct_flexible=grade.flexible, extracted=grade.answer)
        save_rows(rows, ctx.out_dir / "data")
        breakdown = c.breakdown or list(ctx.task.breakdown)
        metrics = score(rows, c, seed=ctx.seed("bootstrap"), breakdown=breakdown)
        return {"weights": weights.label, **metrics}


def score(rows: list[dict], config: "Evaluate.Config", seed: int, breakdown: list[str] | None = None) -> dict:
    """Statistics over graded sample rows (one or more per problem); `breakdown` defaults to config.breakdown."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_problem[row["problem_id"]].append(row)
    groups = [sorted(g, key=lambda r: r["index"]) for g in by_problem.values()]
    resamples = config.bootstrap_resamples
    n = config.sampling.n
    out: dict = {"problems": len(groups), "samples": len(rows),
                 "mean_tokens": sum(r["num_tokens"] for r in rows) / len(rows) if rows else 0.0,
                 "truncated": sum(r["finish_reason"] == "length" for r in rows)}
    out.update(summarize("accuracy", [float(g[0]["correct"]) for g in groups], seed, resamples))
    out.update(summarize("accuracy_flexible", [float(g[0]["correct_flexible"]) for g in groups], seed, resamples))
    if n > 1:
        for k in config.pass_k or sorted({1, n}):
            values = [pass_at_k(len(g), sum(r["correct"] for r in g), k) for g in groups]
            out.update(summarize(f"pass@{k}", values, seed, resamples))
        values = [float(majority_correct([r["extracted"] for r in g], [r["correct"] for r in g])) for g in groups]
        out.update(summarize(f"maj@{n}", values, seed, resamples))
    for column in config.breakdown if breakdown is None else breakdown:
        buckets: dict[str, list[float]] = defaultdict(list)
        for g in groups:
            buckets[str(g[0].get(column))].append(float(g[0]["correct"]))
        for value, values in sorted(buckets.items()):
            out[f"by/{column}={value}/accuracy"] = sum(values) / len(values)
            out[f"by/{column}={value}/problems"] = len(values)
    return out
