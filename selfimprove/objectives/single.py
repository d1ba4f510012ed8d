"""Single-turn RL on a verifiable (or any critic's) reward: GRPO, RLOO, Dr. GRPO, REINFORCE++ — the trainer's
baseline decides which (baselines/)."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import OBJECTIVES
from .base import Objective


@OBJECTIVES.register("single")
class Single(Objective):
    """One attempt, its critic score as reward, KL `beta` to the reference on its tokens."""

    @dataclass
    class Config:
        beta: float = 0.01

        def __post_init__(self):
            if self.beta < 0:
                raise ValueError("beta must be >= 0")

    def rewards(self, scores: list[float]) -> list[float | None]:
        (score,) = scores
        return [score]

    def kl_weights(self) -> list[float]:
        return [self.config.beta]
