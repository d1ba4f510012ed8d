"""REINFORCE++ with a group baseline (Hu, 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
Language Models"; OpenRLHF's `reinforce_baseline` estimator): each reward minus its group's mean, then the
advantages of the whole batch normalised together — minus their batch mean, divided by their batch standard
deviation (+ eps). Normalising over the batch instead of per group is the method's point: a group whose
samples differ by a hair is not blown up to unit variance as in GRPO.

Aggregation: OpenRLHF's default `token_level_loss` is `loss_agg_mode: token-mean`.

Deviations: OpenRLHF whitens the advantages over the batch's *tokens* (each trajectory's advantage broadcast
to its tokens, so a long trajectory weighs more in the mean and std); here each trajectory counts once (a
baseline sees rewards, not lengths). The KL to the reference is the trainer's k3 loss term on each token
(OpenRLHF's `use_kl_loss` option for this estimator), not a penalty folded into the token rewards; trajectories
whose reward is None (an attempt the objective does not reward) and groups of one take no part in the batch
statistics and get 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean, stdev

from ..registry import BASELINES
from .base import by_group
from .dr_grpo import DrGRPO


@BASELINES.register("reinforce_pp")
class ReinforcePlusPlus(DrGRPO):  # Dr. GRPO's centring per group, then the batch's whitening
    @dataclass
    class Config:
        eps: float = 1e-8  # added to the batch's std (OpenRLHF's whitening constant)

        def __post_init__(self):
            if self.eps <= 0:
                raise ValueError("eps must be > 0")

    def advantages(self, rewards: list[float | None], groups: list[str]) -> list[float]:
        out = super().advantages(rewards, groups)
        members = [i for idx in by_group(rewards, groups) for i in idx]  # none, or two or more
        if members:
            mean, std = fmean(out[i] for i in members), stdev(out[i] for i in members)
            for i in members:
                out[i] = (out[i] - mean) / (std + self.config.eps)
        return out
