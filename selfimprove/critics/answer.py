"""The answer check: the task's own grader against the gold answer (GSM8K, arithmetic, any task with answers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..registry import CRITICS
from .base import Critic, Verdict


@CRITICS.register("answer")
class AnswerCritic(Critic):
    reads_gold = True  # refused on label-free data at config load (stages.base.gold_critics)

    @dataclass
    class Config:
        mode: Literal["strict", "flexible"] = "strict"  # strict: the task's answer format is required

    def judge(self, samples: list[dict]) -> list[Verdict]:
        verdicts = []
        for sample in samples:
            grade = self.context.task.grade(sample, sample["completion"])
            ok, got = getattr(grade, self.config.mode), getattr(grade, f"{self.config.mode}_answer")
            # ok is None where the problem has no gold (label-free data): an unlabelled verdict, not a 0
            verdicts.append(Verdict(score=None if ok is None else float(ok), label=ok,
                                    rationale=f"extracted {got!r}, gold {sample['answer']!r}"))
        return verdicts
