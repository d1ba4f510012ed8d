"""GRPO (Shao et al., 2024, DeepSeekMath): each reward minus its group's mean, divided by the group's standard
deviation (+ eps). The paper averages an attempt's per-token losses over its tokens, then over the group:
`loss_agg_mode: seq-mean-token-mean` (DAPO's token-mean is verl's and TRL's default for GRPO today)."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import BASELINES
from .base import Baseline, by_group, mean_std


@BASELINES.register("grpo")
class GRPO(Baseline):
    @dataclass
    class Config:
        eps: float = 1e-4  # added to the group's std (TRL's value): a group of equal rewards gets advantage 0

        def __post_init__(self):
            if self.eps <= 0:
                raise ValueError("eps must be > 0")

    def advantages(self, rewards: list[float | None], groups: list[str]) -> list[float]:
        out = [0.0] * len(rewards)
        for idx in by_group(rewards, groups):
            mean, std = mean_std([rewards[i] for i in idx])
            for i in idx:
                out[i] = (rewards[i] - mean) / (std + self.config.eps)
        return out
