"""Majority vote: a label-free critic (self-consistency, Wang et al., 2023; TTRL-style pseudo-labels).

Per problem, each sample's answer is what the task extracts (`task.grade(...).answer`); the most common one
becomes the pseudo-label (ties go to the answer seen first, as in the evaluate stage's maj@k). A sample is
labelled correct when the task's own grader accepts it against the pseudo-label, so equivalent answers written
differently ("0.5" and "\\frac{1}{2}") agree even though the vote counts distinct strings. Its score, with
`score: share` (the default), is its own answer's vote share: the majority's share for the majority, less for
minority answers, 0 without an answer. With `score: agreement` it is 1 when the sample is labelled correct and 0
otherwise: TTRL's reward (agreement with the majority), which pipelines/ttrl_arithmetic.yaml uses.
The gold answer is never read for a verdict.

`stats` reports what TTRL (Zuo et al., 2025) logs per RL step, and warns when the winning vote share stays high
(a collapsed model agrees with itself); what each number means: docs/critics.md.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from ..registry import CRITICS
from .base import Critic, Verdict
from .calls import positions_by

log = logging.getLogger(__name__)


@CRITICS.register("majority")
class MajorityCritic(Critic):
    per_problem = True

    @dataclass
    class Config:
        min_share: float = 0.0  # label nothing correct unless the winning answer has at least this vote share
        score: Literal["share", "agreement"] = "share"  # the sample's vote share, or 1/0 agreement (TTRL's reward)
        saturation: float = 0.95  # warn when the mean winning vote share stays at least this ...
        saturation_steps: int = 3  # ... for this many batches (rl steps) in a row

        def __post_init__(self):
            if not 0.0 <= self.min_share <= 1.0 or not 0.0 < self.saturation <= 1.0:
                raise ValueError(f"min_share must be in [0, 1] and saturation in (0, 1], got {self.min_share} "
                                 f"and {self.saturation}")
            if self.saturation_steps < 1:
                raise ValueError(f"saturation_steps must be >= 1, got {self.saturation_steps}")

    def __init__(self, config, context):
        super().__init__(config, context)
        self._saturated_run = 0  # consecutive batches at or above the saturation ratio

    def judge(self, samples: list[dict]) -> list[Verdict]:
        task = self.context.task
        verdicts: list[Verdict | None] = [None] * len(samples)
        for indices, answers, votes, winner in self._votes(samples):
            total = len(indices)
            if winner is None:
                for i in indices:
                    verdicts[i] = Verdict(score=0.0, label=False, rationale=f"no answer among {total} samples")
                continue
            best = votes[winner]
            confident = best / total >= self.config.min_share
            for i, mine in zip(indices, answers):
                agrees = mine is not None and _agrees(task.grade({**samples[i], "answer": winner}, samples[i]["completion"]))
                label = bool(agrees and confident)
                share = votes[mine] / total if mine is not None else 0.0
                verdicts[i] = Verdict(
                    score=float(label) if self.config.score == "agreement" else share,
                    label=label,
                    rationale=f"answer {mine!r}; pseudo-label {winner!r} with {best}/{total} votes",
                )
        return verdicts

    def _votes(self, samples: list[dict]):
        """Per problem: its sample indices, their extracted answers, the vote counts and the winner (None when no
        sample has an answer; ties go to the answer seen first)."""
        task = self.context.task
        for indices in positions_by(s["problem_id"] for s in samples).values():
            answers = [task.grade(samples[i], samples[i]["completion"]).answer for i in indices]
            votes = Counter(a for a in answers if a is not None)
            winner = max(votes, key=votes.get) if votes else None  # max keeps the first of equal counts
            yield indices, answers, votes, winner

    def stats(self, samples: list[dict], verdicts: list[Verdict]) -> dict[str, float | None]:
        task = self.context.task
        ratios, label_right, reward_right = [], [], []
        for indices, answers, votes, winner in self._votes(samples):
            ratios.append(votes[winner] / len(indices) if winner is not None else 0.0)
            if not samples[indices[0]].get("answer"):
                continue  # no gold for this problem (as the filter's monitor reads it)
            gold = [task.grade(samples[i], samples[i]["completion"]).correct for i in indices]
            label_right.append(any(g for g, a in zip(gold, answers) if a == winner) if winner is not None else False)
            reward_right += [bool(verdicts[i].label) == g for i, g in zip(indices, gold) if verdicts[i].error is None]
        ratio = sum(ratios) / len(ratios) if ratios else None
        self._saturated_run = self._saturated_run + 1 if ratio is not None and ratio >= self.config.saturation else 0
        saturated = self._saturated_run >= self.config.saturation_steps
        if saturated:
            log.warning("majority vote saturated: mean winning share %.3f >= %g for %d batches in a row; a collapsed "
                        "model agrees with itself, so its pseudo-labels no longer carry signal", ratio,
                        self.config.saturation, self._saturated_run)
        return {"majority_ratio": ratio, "saturated": float(saturated),
                "label_accuracy": sum(label_right) / len(label_right) if label_right else None,
                "reward_accuracy": sum(reward_right) / len(reward_right) if reward_right else None}


def _agrees(grade) -> bool:
    """Graded against the pseudo-label through the same extraction that produced the sample's vote
    (`Grade.answer`: the strict answer when there is one, else the flexible one)."""
    return grade.strict if grade.strict_answer is not None else grade.flexible
