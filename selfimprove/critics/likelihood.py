"""Likelihood: a response scored by the policy's own log-probability of it (Sharpening, Huang et al., 2024,
"Self-Improvement in Language Models: The Sharpening Mechanism").

The score is log π(y | x) under the weights that wrote the sample, at temperature 1 (the model's own
distribution, not the sampling one), read with `Engine.choice_logprobs`; `normalise: per_token` divides it by
the completion's length in tokens (the sampled token count), `sum` keeps the total. Best-of-N on it
(`filter: {best_of: true}`) then SFT is SFT-Sharpening; the rl stage with it as reward is RL-Sharpening.
Deviations from the paper: the EOS token's probability is not part of the score (choice_logprobs scores the
text), and the paper's default is the sequence log-probability (`sum`) where the length-normalised one is an
option here. The score needs no gold; `stats` reports its AUROC against gold where there is gold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .. import metrics
from ..registry import CRITICS
from .base import Critic, Verdict


@CRITICS.register("likelihood")
class LikelihoodCritic(Critic):
    batched = True
    per_problem = True  # a problem's samples share a prompt: one engine call scores them together

    @dataclass
    class Config:
        normalise: Literal["per_token", "sum"] = "per_token"  # per_token: mean log-probability per token; sum: total

    def judge(self, samples: list[dict]) -> list[Verdict]:
        by_prompt: dict[str, list[int]] = {}
        verdicts: list[Verdict | None] = [None] * len(samples)
        for i, s in enumerate(samples):
            if not s["completion"]:  # an empty text would score log 1 = 0, the best possible
                verdicts[i] = Verdict(score=None, error="empty completion: nothing to score")
            else:
                by_prompt.setdefault(repr(s["prompt"]), []).append(i)
        engine = self.context.engine()
        for indices in by_prompt.values():
            texts = list(dict.fromkeys(samples[i]["completion"] for i in indices))
            [logprobs] = engine.choice_logprobs([samples[indices[0]]["prompt"]], texts, self.context.weights)
            for i in indices:
                total = logprobs[samples[i]["completion"]]
                tokens = len(samples[i]["token_ids"]) if samples[i].get("token_ids") else samples[i].get("num_tokens")
                if self.config.normalise == "per_token" and not tokens:
                    verdicts[i] = Verdict(score=None, error="per_token needs the sample's token count (num_tokens)")
                    continue
                score = total / tokens if self.config.normalise == "per_token" else total
                verdicts[i] = Verdict(score=score, rationale=f"log p = {total:.3f} over {tokens} tokens")
        return verdicts

    def stats(self, samples: list[dict], verdicts: list[Verdict]) -> dict[str, float | None]:
        task = self.context.task
        pairs = [(v.score, task.grade(s, s["completion"]).correct) for s, v in zip(samples, verdicts)
                 if v.score is not None and s.get("answer")]
        auroc, _, _ = metrics.auroc_interval([p[0] for p in pairs], [p[1] for p in pairs])
        return {"auroc": auroc}
