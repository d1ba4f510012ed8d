"""The objective protocol: what an on-policy RL stage optimises, independent of how advantages are estimated.

An objective (with its own `Config`, e.g. `objective: {name: score_stage2, alpha: 10}`) declares how many
`attempts` a trajectory has (1 for single-turn RL, 2 for SCoRe), the prompt of each next attempt
(`follow_up(prompt, completion)`, from the previous attempt's), the reward each attempt's tokens are trained on
given the critic's score of each attempt (`rewards(scores)`; None: no reward term, only the KL term), and the
KL-to-reference coefficient on each attempt's tokens (`kl_weights()`). The rl stage samples the attempts, asks the
critic for scores, and hands rewards and KL weights to the trainer, whose baseline turns rewards into advantages
(baselines/). A new objective is one file: a registered subclass, named in YAML.
"""

from __future__ import annotations

from ..records import Prompt


class Objective:
    attempts: int = 1
    Config: type

    def __init__(self, config):
        self.config = config

    def follow_up(self, prompt: Prompt, completion: str) -> Prompt:
        raise NotImplementedError(f"{type(self).__name__} has one attempt: there is no follow-up prompt")

    def rewards(self, scores: list[float]) -> list[float | None]:
        raise NotImplementedError

    def kl_weights(self) -> list[float]:
        raise NotImplementedError
