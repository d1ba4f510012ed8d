"""Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"): GRPO without its
two normalisations, which the paper shows bias optimisation — no division by the group's standard deviation
(questions with low reward variance get no extra weight), and no division by the response length. The second
is the loss aggregation, the trainer's `loss_agg_mode: seq-mean-token-sum-norm` (an attempt's per-token losses
summed and divided by the sampling budget `max_tokens`, a constant, so long wrong answers are not penalised
less per token than short ones); dr_grpo_arithmetic.yaml sets it."""

from __future__ import annotations

from statistics import fmean

from ..registry import BASELINES
from .base import Baseline


@BASELINES.register("dr_grpo")
class DrGRPO(Baseline):
    def group(self, rewards: list[float]) -> list[float]:
        mean = fmean(rewards)
        return [r - mean for r in rewards]
