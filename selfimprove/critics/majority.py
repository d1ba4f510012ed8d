"""Majority vote: a label-free critic (self-consistency, Wang et al., 2023; TTRL-style pseudo-labels).

Per problem, each sample's answer is what the task extracts (`task.grade(...).answer`); the most common one
becomes the pseudo-label (ties go to the answer seen first, as in the evaluate stage's maj@k). A sample is
labelled correct when the task's own grader accepts it against the pseudo-label, so equivalent answers written
differently ("0.5" and "\\frac{1}{2}") agree even though the vote counts distinct strings. Its score is its
own answer's vote share: the majority's share for the majority, less for minority answers, 0 without an answer.
The gold answer is never read.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from ..registry import CRITICS
from .base import Critic, Verdict


@CRITICS.register("majority")
class MajorityCritic(Critic):
    per_problem = True

    @dataclass
    class Config:
        min_share: float = 0.0  # label nothing correct unless the winning answer has at least this vote share

        def __post_init__(self):
            if not 0.0 <= self.min_share <= 1.0:
                raise ValueError(f"min_share must be in [0, 1], got {self.min_share}")

    def judge(self, samples: list[dict]) -> list[Verdict]:
        task = self.context.task
        answers = [task.grade(s, s["completion"]).answer for s in samples]
        by_problem: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            by_problem[s["problem_id"]].append(i)
        verdicts: list[Verdict | None] = [None] * len(samples)
        for indices in by_problem.values():
            votes = Counter(answers[i] for i in indices if answers[i] is not None)
            total = len(indices)
            if not votes:
                for i in indices:
                    verdicts[i] = Verdict(score=0.0, label=False, rationale=f"no answer among {total} samples")
                continue
            best = max(votes.values())
            winner = next(answers[i] for i in indices if answers[i] is not None and votes[answers[i]] == best)
            confident = best / total >= self.config.min_share
            for i in indices:
                mine = answers[i]
                agrees = mine is not None and _agrees(task.grade({**samples[i], "answer": winner}, samples[i]["completion"]))
                verdicts[i] = Verdict(
                    score=votes[mine] / total if mine is not None else 0.0,
                    label=bool(agrees and confident),
                    rationale=f"answer {mine!r}; pseudo-label {winner!r} with {best}/{total} votes",
                )
        return verdicts


def _agrees(grade) -> bool:
    """Graded against the pseudo-label through the same extraction that produced the sample's vote
    (`Grade.answer`: the strict answer when there is one, else the flexible one)."""
    return grade.strict if grade.strict_answer is not None else grade.flexible
