"""A process reward model's verdict: the steps of the response (`Task.steps`) scored by a train_prm stage's adapter
(selfimprove/prm.py), P(step correct) each, and aggregated into one score: `min` (the weakest step, Math-Shepherd's
choice for ranking solutions), `prod` or `last`. `weights:` names the train_prm stage, resolved as self_verify's
`weights:` is. The per-step scores are kept in the verdict's rationale. A response with no steps, or whose
steps truncation cut off, gets no verdict (an error), not a score.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..prm import MAX_LENGTH, Aggregate, ProcessRewardModel, aggregate
from ..registry import CRITICS
from .base import Critic, Verdict


@CRITICS.register("prm")
class PRMCritic(Critic):
    batched = True
    reads_process_rewards = True  # its `weights:` must name a train_prm stage (stages/common.py check_weights)

    @dataclass
    class Config:
        weights: str  # the train_prm stage whose adapter scores the steps
        aggregate: Aggregate = "min"
        threshold: float | None = 0.5  # label = score >= threshold; None: scores only
        batch_size: int = 8
        max_length: int = MAX_LENGTH  # tokens per response, at most: by default what it trained on
        device: str = "auto"  # "auto" = cuda when available, else cpu

    def __init__(self, config: "PRMCritic.Config", context):
        super().__init__(config, context)
        self.prm: ProcessRewardModel | None = None  # loaded on first use: its weights are resolved then

    def judge(self, samples: list[dict]) -> list[Verdict]:
        c = self.config
        if self.prm is None:
            if self.context.stage_weights is None:
                raise ValueError(f"prm: weights: {c.weights!r} names a train_prm stage, which only a critique or rl "
                                 f"stage resolves")
            weights = self.context.stage_weights(c.weights)
            if weights.adapter is None:
                raise ValueError(f"prm: weights: {c.weights!r} gave the base model: no train_prm stage has finished")
            self.prm = ProcessRewardModel(weights.base, weights.adapter, c.max_length, c.device)
        steps = [self.context.task.steps(s["completion"]) for s in samples]
        scores = self.prm.step_scores([s["prompt"] for s in samples], steps, c.batch_size)
        return [self.verdict(step_scores) for step_scores in scores]

    def verdict(self, step_scores: list[float | None]) -> Verdict:
        c = self.config
        if not step_scores:
            return Verdict(score=None, error="the response has no steps")
        if None in step_scores:
            return Verdict(score=None, error=f"truncation at max_length={c.max_length} cut off "
                                             f"{step_scores.count(None)} of {len(step_scores)} steps")
        score = aggregate(step_scores, c.aggregate)
        return Verdict(score=score, label=None if c.threshold is None else score >= c.threshold,
                       rationale=f"{c.aggregate} {score:.4f} of step scores "
                                 f"[{', '.join(f'{s:.4f}' for s in step_scores)}]")

    def close(self) -> None:
        if self.prm is not None:
            self.prm.close()
        self.prm = None
