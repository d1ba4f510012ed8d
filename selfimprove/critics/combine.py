"""Composition: one verdict from the verdicts of critics that ran earlier in the same critique stage (an example:
docs/critics.md). score = the weighted mean of the named critics' scores (`weights`; without weights, the plain
mean of the gated critics' scores). label = every gate passes (score >= its minimum; a correct `answer` scores
1.0) and, with a `threshold`, score >= threshold; with neither gates nor threshold there is no label. Combining
earlier verdicts by id, instead of nesting critics, runs each critic once and keeps every component's verdicts
and quality metrics beside the combination's. A component that failed on a sample fails the combination on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..registry import CRITICS
from .base import Critic, Verdict


@CRITICS.register("combine")
class CombineCritic(Critic):
    @dataclass
    class Config:
        weights: dict[str, float] = field(default_factory=dict)  # critic id → weight
        gates: dict[str, float] = field(default_factory=dict)  # critic id → minimum score
        threshold: float | None = None

        def __post_init__(self):
            if not self.weights and not self.gates:
                raise ValueError("combine needs weights or gates (critic ids of earlier critics in this stage)")
            if any(w < 0 for w in self.weights.values()) or (self.weights and sum(self.weights.values()) <= 0):
                raise ValueError(f"weights must be >= 0 and not all 0, got {self.weights}")

        def references(self) -> list[str]:
            return sorted(set(self.weights) | set(self.gates))

    def judge(self, samples: list[dict]) -> list[Verdict]:
        return [self.combine(s.get("verdicts") or {}) for s in samples]

    def combine(self, verdicts: dict) -> Verdict:
        c = self.config
        scores = {}
        for critic_id in c.references():
            if critic_id not in verdicts:
                raise KeyError(f"combine: no verdict of critic {critic_id!r} on this sample; critics that ran "
                               f"before it: {', '.join(verdicts) or '(none)'}")
            v = verdicts[critic_id]
            if v.get("error") or v.get("score") is None:
                return Verdict(score=None, error=f"component {critic_id!r} has no score: {v.get('error')}")
            scores[critic_id] = float(v["score"])
        weights = c.weights or {k: 1.0 for k in c.gates}
        score = sum(w * scores[k] for k, w in weights.items()) / sum(weights.values())
        failed = [k for k, minimum in c.gates.items() if scores[k] < minimum]
        label = None
        if c.gates or c.threshold is not None:
            label = not failed and (c.threshold is None or score >= c.threshold)
        parts = ", ".join(f"{k}={v:.3g}" for k, v in scores.items())
        return Verdict(score=score, label=label, rationale=f"{parts}" + (f"; failed gates {failed}" if failed else ""))
