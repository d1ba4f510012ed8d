"""RLOO (Ahmadian et al., 2024, "Back to Basics"): each reward minus the mean of the *other* samples of its group
(leave-one-out), unscaled. The paper treats a whole completion as one action, its log-probability the sum of
its tokens': `loss_agg_mode: seq-mean-token-sum`."""

from __future__ import annotations

from ..registry import BASELINES
from .base import Baseline, by_group


@BASELINES.register("rloo")
class RLOO(Baseline):
    def advantages(self, rewards: list[float | None], groups: list[str]) -> list[float]:
        out = [0.0] * len(rewards)
        for idx in by_group(rewards, groups):
            total, n = sum(rewards[i] for i in idx), len(idx)
            for i in idx:
                out[i] = rewards[i] - (total - rewards[i]) / (n - 1)
        return out
