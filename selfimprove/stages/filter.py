"""Selection: turn judged samples into an SFT training set (STaR's and ReST-EM's filter).

`filter` keeps the samples the deciding critic labelled correct, or scored at least `min_score`, or, with
`best_of`, each problem's highest-scored one per source (best-of-N: Sharpening's selection); invalid verdicts are
left out (`invalid`). A source is a generate stage and the critique stage that judged it; a hinted sample (STaR's
rationalization) is stored *without* its hint, so the model learns to produce the rationale from the question
alone. Rows: records.py's training schema. The B-STaR monitor (monitor.py) reports on the first source.

STaR as `pipelines/star_arithmetic.yaml` arranges it (generate → critique → rationalize → critique → filter →
train from the base → evaluate) deviates from Zelikman et al. (2022) in these ways, each a config choice:
- a LoRA adapter is trained (the paper fine-tunes all of GPT-J's weights);
- each iteration samples `n` rationales per problem at a temperature > 0 (the paper: one per problem) and
  rationalizes with `n` hinted samples (the paper: one), keeping at most `max_per_problem` distinct correct
  rationales per problem (the paper keeps its single one);
- each iteration draws a fresh random subset of `num_problems` training problems (the paper: the whole set);
- the training length is `epochs` over the kept examples; the paper's schedule (40 steps, +20% per
  iteration) is `optim: {max_steps: 40, steps_growth: 1.2}`;
- the hint is a sentence in the user turn ("The correct answer is N") rather than an answer placed in
  few-shot exemplars, and prompts are zero-shot chat rather than few-shot (see tasks/arithmetic.py).
Everything else follows the paper: only correct rationales are kept, rationalizations lose their hint, and
every iteration restarts training from the base model on the data that iteration's model generated.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ..artifacts import load_rows, read_json, save_rows
from ..monitor import N_STAR, monitor_round
from ..records import reply
from ..registry import STAGES
from .base import Stage
from .common import check_critic_choice, join_verdicts, selected


@dataclass
class Source:
    samples: str
    verdicts: str


@STAGES.register("filter")
class Filter(Stage):
    @dataclass
    class Config:
        sources: list[Source] = field(default_factory=lambda: [Source("generate", "critique")])
        # The critic id (in the sources' critique stages) whose verdict decides; None = the only critic there.
        critic: str | None = None
        # Keep a sample when that verdict's score is >= min_score (a reward threshold), instead of by its label;
        # min_score_from: a generate stage with `adapt` whose chosen threshold to use (B-STaR), when it chose one.
        min_score: float | None = None
        min_score_from: str | None = None
        # Keep only each problem's highest-scored sample (per source; the first of equal scores) instead of by label.
        best_of: bool = False
        max_per_problem: int | None = None  # cap on kept samples per problem (None = keep all)
        dedupe: bool = True  # drop a completion identical to one already kept for the same problem
        bstar_n_star: int = N_STAR  # B-STaR's n*: correct kept samples for a query to count fully

        def __post_init__(self):
            if not self.sources:
                raise ValueError("sources must name at least one {samples, verdicts} pair")
            if self.best_of and (self.min_score is not None or self.min_score_from):
                raise ValueError("best_of selects by score rank; drop min_score / min_score_from (or best_of)")

    @classmethod
    def references(cls, config) -> list[str]:
        return [name for s in config.sources for name in (s.samples, s.verdicts)] + \
            ([config.min_score_from] if config.min_score_from else [])

    @classmethod
    def check(cls, config, earlier: dict) -> None:
        for source in config.sources:
            check_critic_choice(config.critic, source.verdicts, earlier)
        if config.min_score_from and getattr(earlier[config.min_score_from].config, "adapt", None) is None:
            raise ValueError(f"min_score_from: stage {config.min_score_from!r} does not adapt its sampling "
                             f"(no `adapt:`), so it chooses no threshold")

    def run(self) -> dict:
        ctx, c = self.ctx, self.config
        kept: dict[str, list[dict]] = defaultdict(list)
        seen: dict[str, set[str]] = defaultdict(set)  # per problem, the kept completions (stripped), for dedupe
        counts: dict[str, int] = defaultdict(int)
        chosen = (read_json(ctx.input_dir(c.min_score_from) / "manifest.json")["metrics"].get("adapt/threshold")
                  if c.min_score_from else None)
        threshold = c.min_score if chosen is None else chosen
        monitored: list[dict] = []
        for source in c.sources:
            samples = load_rows(ctx.input_dir(source.samples) / "data")
            monitored = monitored or samples
            joined = join_verdicts(samples, load_rows(ctx.input_dir(source.verdicts) / "data"), c.critic,
                                   source.verdicts)
            best = _best_per_problem(joined) if c.best_of else None
            for sample, verdict in joined:
                if verdict is not None and verdict["error"] is not None:
                    counts["invalid"] += 1  # left out: an invalid verdict is no evidence either way
                    continue
                if best is not None:
                    if best.get(sample["problem_id"]) != sample["sample_id"]:
                        continue
                elif verdict is not None and threshold is None and verdict["label"] is None:
                    raise ValueError(
                        f"filter {ctx.stage!r}: critic {verdict['critic']!r} in stage {source.verdicts!r} gives "
                        f"scores without labels, so selecting by label would keep nothing; set `min_score:` on "
                        f"{ctx.stage!r} to keep samples scored at least that, or `best_of: true` to keep the best")
                elif not selected(verdict, threshold):
                    continue
                pid, text = sample["problem_id"], sample["completion"].strip()
                if c.dedupe and text in seen[pid]:
                    counts["duplicates"] += 1
                    continue
                if c.max_per_problem is not None and len(kept[pid]) >= c.max_per_problem:
                    continue
                prompt = ctx.task.prompt(sample, hint=False)  # rationalizations lose their hint here
                kept[pid].append({
                    "prompt": prompt, "completion": reply(prompt, sample["completion"]),
                    "problem_id": pid, "sample_ids": [sample["sample_id"]], "source": source.samples,
                    "rationalized": bool(sample.get("hint", False)),
                })
                seen[pid].add(text)
                counts[f"kept/{source.samples}"] += 1
        rows = [row for pid in sorted(kept) for row in kept[pid]]
        save_rows(rows, ctx.out_dir / "data")
        return {"examples": len(rows), "problems": len(kept), "min_score": threshold,
                "invalid": counts.pop("invalid", 0), "rationalized": sum(r["rationalized"] for r in rows), **counts,
                **self._monitor(monitored, {i for r in rows for i in r["sample_ids"]})}

    def _monitor(self, samples: list[dict], kept_ids: set[str]) -> dict:
        """B-STaR's view of the round's own samples: gold and extracted answers from the task's grader (no gold
        where the sample has no answer); NaN (nothing to measure) is recorded as None."""
        task = self.ctx.task
        grades = [task.grade(s, s["completion"]) if s.get("answer") else None for s in samples]
        rows = [{**s, "extracted": g.answer if g else None} for s, g in zip(samples, grades)]
        metrics = monitor_round(rows, [g.correct if g else None for g in grades], kept_ids, self.config.bstar_n_star)
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        cells = {"kept": str(metrics["examples"]), "rationalized": str(metrics["rationalized"])}
        if metrics.get("min_score") is not None:
            cells["min score"] = f"{metrics['min_score']:g}"
        if metrics.get("invalid"):
            cells["invalid"] = str(metrics["invalid"])
        if metrics.get("bstar/balance") is not None and metrics.get("bstar/pass@k") is not None:
            cells["B-STaR pass@k / balance"] = f"{metrics['bstar/pass@k']:.2f} / {metrics['bstar/balance']:.3f}"
        return cells


def _best_per_problem(joined: list[tuple[dict, dict | None]]) -> dict[str, str]:
    """Per problem, the sample id with the highest valid score (the first of equal ones)."""
    scored = [(s, v["score"]) for s, v in joined if v is not None and v["error"] is None and v["score"] is not None]
    # ascending by score, equal scores in reverse order: each problem's last entry is its best (first of equal ones)
    return {s["problem_id"]: s["sample_id"] for s, _ in sorted(reversed(scored), key=lambda x: x[1])}
