"""SCoRe's two stages (Kumar et al., 2024, "Training Language Models to Self-Correct via Reinforcement Learning").

Both have two attempts: attempt 2 answers after the self-correction instruction (selfcorrection.second_prompt).
Defaults are the paper's: α = 10, β1 = 0.01, β2 = 0.1.
- `score_stage1`: only attempt 2 is rewarded; attempt 1 is held near the base by a strong KL term (β2), and
  attempt 2 gets the general KL term (β1). (The paper states the β2 term on attempt 1; the β1 term on attempt 2
  is its general KL penalty.)
- `score_stage2`: r(y1) for attempt 1, and r(y2) + α·(r(y2) − r(y1)) for attempt 2: the shaping bonus pays for
  turning a wrong answer into a right one and charges for the reverse. KL β1 on both attempts.

Deviation from the paper: each attempt's tokens are credited with that attempt's reward only (no return summed
over later turns). Crediting attempt 1 with attempt 2's shaped reward would give it −α·r(y1), i.e. teach the
model to answer wrongly first so that it can "correct" itself: the collapse the bonus exists to prevent. The
paper's objective sums the per-attempt rewards; this is that sum with a discount of 0 between attempts. The
paper trains with REINFORCE on large batches; here the trainer's baseline (GRPO by default) compares a
problem's trajectories, which lowers variance at small batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import Prompt
from ..registry import OBJECTIVES
from ..selfcorrection import INSTRUCTION, second_prompt
from .base import Objective


class _SelfCorrection(Objective):
    attempts = 2

    @dataclass
    class Config:
        instruction: str = INSTRUCTION  # the self-correction instruction before attempt 2
        beta1: float = 0.01  # KL to the reference: on attempt 2 in stage I, on both attempts in stage II

        def __post_init__(self):
            negative = [name for name, value in vars(self).items() if name != "instruction" and value < 0]
            if negative:
                raise ValueError(f"{' and '.join(negative)} must be >= 0")

    def follow_up(self, prompt: Prompt, completion: str) -> Prompt:
        return second_prompt(prompt, completion, self.config.instruction)


@OBJECTIVES.register("score_stage1")
class ScoreStage1(_SelfCorrection):
    @dataclass
    class Config(_SelfCorrection.Config):
        beta2: float = 0.1  # KL to the reference on attempt 1 (keeps it near the base)

    def rewards(self, scores: list[float]) -> list[float | None]:
        _, r2 = scores
        return [None, r2]

    def kl_weights(self) -> list[float]:
        return [self.config.beta2, self.config.beta1]


@OBJECTIVES.register("score_stage2")
class ScoreStage2(_SelfCorrection):
    @dataclass
    class Config(_SelfCorrection.Config):
        alpha: float = 10.0  # the shaping bonus α·(r(y2) − r(y1)) on attempt 2

    def rewards(self, scores: list[float]) -> list[float | None]:
        r1, r2 = scores
        return [r1, r2 + self.config.alpha * (r2 - r1)]

    def kl_weights(self) -> list[float]:
        return [self.config.beta1, self.config.beta1]
