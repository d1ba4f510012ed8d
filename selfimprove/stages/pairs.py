"""Preference pairs for DPO-style trainers.

`pairs` pairs a problem's samples by a critic's verdicts: `correct_incorrect` a sample labelled correct with one
labelled incorrect; `best_worst` the i-th best-scored with the i-th worst while their scores differ by at least
`min_margin` (and by more than 0). Identical texts are never paired (duplicates are dropped first). `spin_pairs`
builds SPIN's pairs (Chen et al., 2024): the task's gold solution is "chosen", the current model's own generation
for the same prompt "rejected". Rows: records.py's pair schema (`chosen_sample_id` and scores None for gold).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

from ..artifacts import load_rows, save_rows
from ..records import reply
from ..registry import STAGES
from .base import Stage
from .common import check_critic_choice, join_verdicts


def _pair(ctx, rejected: dict, chosen: str, chosen_id: str | None = None, scores: tuple = (None, None)) -> dict:
    """A pair row (records.py's schema): the text `chosen` over the sample `rejected`, on its problem's prompt."""
    prompt = ctx.task.prompt(rejected, hint=False)
    return {"prompt": prompt, "chosen": reply(prompt, chosen), "rejected": reply(prompt, rejected["completion"]),
            "problem_id": rejected["problem_id"], "chosen_sample_id": chosen_id,
            "rejected_sample_id": rejected["sample_id"], "chosen_score": scores[0], "rejected_score": scores[1],
            "round": ctx.round}


@STAGES.register("pairs")
class Pairs(Stage):
    @dataclass
    class Config:
        samples: str = "generate"
        verdicts: str = "critique"
        critic: str | None = None  # the critic whose verdicts rank samples; None = the only one present
        rule: Literal["correct_incorrect", "best_worst"] = "correct_incorrect"
        min_margin: float = 0.0  # best_worst: chosen score - rejected score must be >= this (and > 0)
        max_pairs_per_problem: int = 1

        def __post_init__(self):
            if self.max_pairs_per_problem < 1:
                raise ValueError("max_pairs_per_problem must be >= 1")
            if self.min_margin < 0:
                raise ValueError("min_margin must be >= 0")

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.samples, config.verdicts]

    @classmethod
    def check(cls, config, earlier: dict) -> None:
        check_critic_choice(config.critic, config.verdicts, earlier)

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        by_problem: dict[str, list[tuple]] = defaultdict(list)
        for s, verdict in join_verdicts(load_rows(ctx.input_dir(c.samples) / "data"),
                                        load_rows(ctx.input_dir(c.verdicts) / "data"), c.critic, c.verdicts):
            by_problem[s["problem_id"]].append((s, verdict))
        rows, skipped = [], defaultdict(int)
        for group in by_problem.values():
            judged, seen_texts = [], set()
            for s, verdict in sorted(group, key=lambda x: x[0]["index"]):
                text = s["completion"].strip()
                if verdict is not None and verdict["error"] is not None:
                    skipped["invalid"] += 1  # an invalid verdict is no evidence: never a chosen or rejected side
                elif verdict is None or verdict["score"] is None or not text:
                    skipped["unjudged_or_empty"] += 1
                elif text in seen_texts:
                    skipped["duplicate"] += 1
                else:
                    seen_texts.add(text)
                    judged.append((s, verdict))
            pairs = build_pairs(judged, c.rule, c.min_margin, c.max_pairs_per_problem)
            if not pairs:
                skipped["problems_without_pair"] += 1
            rows += [_pair(ctx, bad, good["completion"], good["sample_id"], (float(gv["score"]), float(bv["score"])))
                     for (good, gv), (bad, bv) in pairs]
        save_rows(rows, ctx.out_dir / "data")
        return {"pairs": len(rows), "problems": len(by_problem),
                "problems_with_pairs": len({r["problem_id"] for r in rows}), **skipped}


def build_pairs(judged: list[tuple[dict, dict]], rule: str, min_margin: float, cap: int) -> list[tuple]:
    """Pairs from one problem's (sample, verdict) list, best pairs first; each sample is used at most once."""
    if rule == "correct_incorrect":
        good = sorted([x for x in judged if x[1]["label"] is True], key=lambda x: -x[1]["score"])
        bad = sorted([x for x in judged if x[1]["label"] is False], key=lambda x: x[1]["score"])
        return list(zip(good, bad))[:cap]
    ranked = sorted(judged, key=lambda x: -x[1]["score"])
    pairs = []
    for best, worst in zip(ranked[: len(ranked) // 2], reversed(ranked)):  # the i-th best with the i-th worst
        margin = best[1]["score"] - worst[1]["score"]
        if len(pairs) == cap or margin <= 0 or margin < min_margin:
            break
        pairs.append((best, worst))
    return pairs


@STAGES.register("spin_pairs")
class SpinPairs(Stage):
    @dataclass
    class Config:
        samples: str = "generate"

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.samples]

    @classmethod
    def needs_gold(cls, config) -> str | None:
        return "drop the stage (set it to null): SPIN's chosen side is the gold solution"

    def run(self) -> dict:
        ctx = self.ctx
        samples = load_rows(ctx.input_dir(self.config.samples) / "data")
        rows, identical, no_gold = [], 0, 0
        for s in samples:
            gold = ctx.task.reference_solution(s)
            if gold is None:
                no_gold += 1
                continue
            if s["completion"].strip() == gold.strip():
                identical += 1  # the model already reproduces the gold response: nothing to contrast
                continue
            rows.append(_pair(ctx, s, gold))
        if no_gold == len(samples) and samples:
            raise ValueError(f"task {type(ctx.task).__name__} has no reference solutions: SPIN needs gold responses")
        save_rows(rows, ctx.out_dir / "data")
        return {"pairs": len(rows), "identical_to_gold": identical, "without_gold": no_gold}
