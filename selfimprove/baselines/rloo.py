"""RLOO (Ahmadian et al., 2024, "Back to Basics"): each reward minus the mean of the *other* samples of its group
(leave-one-out), unscaled. The paper treats a whole completion as one action, its log-probability the sum of
its tokens': `loss_agg_mode: seq-mean-token-sum`."""

from __future__ import annotations

from ..registry import BASELINES
from .base import Baseline


@BASELINES.register("rloo")
class RLOO(Baseline):
    def group(self, rewards: list[float]) -> list[float]:
        total, n = sum(rewards), len(rewards)
        return [r - (total - r) / (n - 1) for r in rewards]
