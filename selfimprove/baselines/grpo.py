"""GRPO (Shao et al., 2024, DeepSeekMath): each reward minus its group's mean, divided by the group's standard
deviation (+ eps). The paper averages an attempt's per-token losses over its tokens, then over the group:
`loss_agg_mode: seq-mean-token-mean` (DAPO's token-mean is verl's and TRL's default for GRPO today)."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean, stdev

from ..registry import BASELINES
from .base import Baseline


@BASELINES.register("grpo")
class GRPO(Baseline):
    @dataclass
    class Config:
        eps: float = 1e-4  # added to the group's std (TRL's value): a group of equal rewards gets advantage 0

        def __post_init__(self):
            if self.eps <= 0:
                raise ValueError("eps must be > 0")

    def group(self, rewards: list[float]) -> list[float]:
        mean, std = fmean(rewards), stdev(rewards)  # the unbiased (n − 1) std, as torch.std in TRL's GRPO
        return [(r - mean) / (std + self.config.eps) for r in rewards]
