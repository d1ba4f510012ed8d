"""Evaluate: sample the test problems with some weights, grade every sample, report statistics (which ones, and
their intervals: the README's *Evaluation*; metrics.summarize). This is the code `selfimprove eval` runs too.

`evaluate_self_correction` samples the test problems twice — attempt 1, then attempt 2 after the
self-correction instruction — grades both attempts with the task's grader and reports selfcorrection.py's
metrics. Being an evaluating stage, round 0 runs it on the base model: SCoRe's prompting-only baseline, measured
by the same code as every trained round.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import save_rows
from ..metrics import interval, majority_correct, pass_at_k, summarize
from ..records import SamplingConfig
from ..registry import STAGES
from ..selfcorrection import INSTRUCTION, second_prompt, self_correction_metrics
from .base import Stage
from .common import Bootstrap, Chunking, EvalProblems
from .rollout import sample_problems


@dataclass
class Evaluation:
    """Settings of every evaluating stage: the same problems each round, greedy by default (as the papers evaluate)."""

    problems: EvalProblems = field(default_factory=EvalProblems)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    weights: str = "latest"
    bootstrap: Bootstrap = field(default_factory=Bootstrap)
    chunking: Chunking = field(default_factory=Chunking)


class _Evaluating(Stage):
    evaluates = True

    def _sample(self, **extra):
        """The weights evaluated and the sample rows of the evaluation problems."""
        c, ctx = self.config, self.ctx
        weights = ctx.weights(c.weights)
        return weights, sample_problems(
            engine=ctx.engine, task=ctx.task, problems=c.problems.take(ctx.task), sampling=c.sampling,
            weights=weights, chunking=c.chunking, shard_dir=ctx.out_dir / "shards", seed=ctx.seed,
            round_index=ctx.round, stage=ctx.stage, **extra)


@STAGES.register("evaluate")
class Evaluate(_Evaluating):
    @dataclass
    class Config(Evaluation):
        pass_k: list[int] = field(default_factory=list)  # default: [1, n] when n > 1
        breakdown: list[str] = field(default_factory=list)  # problem columns to break accuracy down by; [] = the task's

        def __post_init__(self):
            bad = [k for k in self.pass_k if not 1 <= k <= self.sampling.n]
            if bad:
                raise ValueError(f"pass_k {bad} must lie in 1..sampling.n ({self.sampling.n})")

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        weights, rows = self._sample()
        for row in rows:
            grade = ctx.task.grade(row, row["completion"])
            row.update(correct=grade.strict, correct_flexible=grade.flexible, extracted=grade.answer)
        save_rows(rows, ctx.out_dir / "data")
        metrics = score(rows, c, seed=ctx.seed("bootstrap"), breakdown=c.breakdown or list(ctx.task.breakdown))
        return {"weights": weights.label, **metrics}

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        return {"weights": metrics["weights"], "accuracy [95% CI]": interval(metrics, "accuracy"),
                "flexible": f"{metrics['accuracy_flexible']:.1%}"}


def score(rows: list[dict], config: "Evaluate.Config", seed: int, breakdown: list[str] | None = None) -> dict:
    """Statistics over graded sample rows (one or more per problem); `breakdown` defaults to config.breakdown."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_problem[row["problem_id"]].append(row)
    groups = [sorted(g, key=lambda r: r["index"]) for g in by_problem.values()]
    resamples, n = config.bootstrap.resamples, config.sampling.n
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


@STAGES.register("evaluate_self_correction")
class EvaluateSelfCorrection(_Evaluating):
    @dataclass
    class Config(Evaluation):
        instruction: str = INSTRUCTION
        grade: Literal["strict", "flexible"] = "strict"  # which of the task's grades counts as correct

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        weights, rows = self._sample(attempts=2,
                                     follow_up=lambda prompt, answer: second_prompt(prompt, answer, c.instruction))
        for row in rows:
            for attempt in row["attempts"]:
                g = ctx.task.grade(row, attempt["completion"])
                attempt.update(correct=bool(g.strict if c.grade == "strict" else g.flexible), extracted=g.answer)
        save_rows(rows, ctx.out_dir / "data")
        metrics = self_correction_metrics([(r["attempts"][0]["correct"], r["attempts"][1]["correct"]) for r in rows],
                                          seed=ctx.seed("bootstrap"), resamples=c.bootstrap.resamples,
                                          groups=[r["problem_id"] for r in rows])
        return {"weights": weights.label, **metrics, "samples": len(rows),
                **{f"mean_tokens@t{t + 1}": sum(r["attempts"][t]["num_tokens"] for r in rows) / len(rows)
                   for t in range(2) if rows}}

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        return {"weights": metrics["weights"], "Acc@t1 [95% CI]": interval(metrics, "accuracy@t1"),
                "Acc@t2 [95% CI]": interval(metrics, "accuracy@t2"),
                "Δ(t1,t2) [95% CI]": interval(metrics, "delta_t1_t2", signed=True),
                "Δi→c": interval(metrics, "delta_i_to_c"), "Δc→i": interval(metrics, "delta_c_to_i"),
                "P(c@t2 | c@t1)": interval(metrics, "confidence"), "P(c@t2 | i@t1)": interval(metrics, "critique")}
