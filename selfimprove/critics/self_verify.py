"""Self-verification: the policy model is asked whether its own answer is correct.

The sample's conversation is continued with one more user turn (`question`), and the score is the probability
of `yes` against `no` as the first words of the model's reply, read from the engine's next-token log-probabilities
(`Engine.choice_logprobs`) rather than from a sampled reply: P(yes) / (P(yes) + P(no)). Both probabilities
come from the weights that generated the samples, or, with `weights:`, from the named ones: a judge's adapter
trained by an earlier `role: judge` train stage (stages/judge.py), or `base`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..registry import CRITICS
from .base import Critic, Verdict


def yes_probability(logprobs: dict[str, float], yes: str, no: str) -> float:
    """P(yes) renormalised over {yes, no}, computed stably from two log-probabilities."""
    ly, ln = logprobs[yes], logprobs[no]
    return 1.0 / (1.0 + math.exp(ln - ly)) if ln - ly < 700 else 0.0


@CRITICS.register("self_verify")
class SelfVerifyCritic(Critic):
    batched = True

    @dataclass
    class Config:
        question: str = "Is the answer above correct? Answer Yes or No."
        yes: str = "Yes"
        no: str = "No"
        threshold: float = 0.5  # label = P(yes) >= threshold
        weights: str | None = None  # judge with these weights (module docstring); None: the sample's own

        def __post_init__(self):
            if not self.yes or not self.no or self.yes == self.no:
                raise ValueError("yes and no must be two different non-empty strings")

    def judge(self, samples: list[dict]) -> list[Verdict]:
        c = self.config
        prompts = [self.conversation(s) for s in samples]
        weights = self.context.weights
        if c.weights is not None:
            if self.context.stage_weights is None:
                raise ValueError(f"self_verify: weights: {c.weights!r} names other weights, which only a critique or "
                                 f"rl stage resolves")
            weights = self.context.stage_weights(c.weights)
        logprobs = self.context.engine().choice_logprobs(prompts, [c.yes, c.no], weights)
        by = f" by {weights.label}" if c.weights is not None else ""  # which judge, when not the sample's weights
        return [Verdict(score=p, label=p >= c.threshold,
                        rationale=f"P({c.yes})={p:.3f} (logprobs {lp[c.yes]:.3f} / {lp[c.no]:.3f}){by}")
                for lp in logprobs for p in [yes_probability(lp, c.yes, c.no)]]

    def conversation(self, sample: dict):
        prompt, completion = sample["prompt"], sample["completion"]
        if isinstance(prompt, str):
            return f"{prompt}{completion}\n\n{self.config.question}\n"
        return [*prompt, {"role": "assistant", "content": completion},
                {"role": "user", "content": self.config.question}]
