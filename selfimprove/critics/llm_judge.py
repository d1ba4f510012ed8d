"""LLM-as-judge: a prompt template filled from the sample, a model's reply, and a parser for its score.

The template is `str.format`ted with the sample's columns (`{question}`, `{completion}`, `{answer}`, any task
column), so a judge may be shown the gold answer or not. The last match of `score_pattern` in the reply is the
raw score, mapped linearly from `scale` onto [0, 1]; label = score >= `threshold`. A reply with no score, a
score off the scale (never clipped: "11/10" would be full reward for gaming the judge), or a request that fails
makes that sample's verdict invalid (its `error` set), and only that one.

Backends (`backend`):
- `policy`: the run's own engine and the weights that generated the samples (the model judges itself: with
  the weights of the round's policy, this is Self-Rewarding's LLM-as-a-judge);
- `vllm`: another local model (`model`: a registered model or a model folder) in an engine of its own, built on
  first use with `engine` and closed after the stage;
- `openai`: any OpenAI-compatible endpoint (`base_url`, `model`), the API key read from the environment
  variable named by `api_key_env`, never from the YAML.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from ..records import SamplingConfig, Weights
from ..registry import CRITICS, EngineSpec
from .base import Critic, Verdict

TEMPLATE = (
    "You are grading a student's solution to a math problem.\n\n"
    "Problem:\n{question}\n\nStudent's solution:\n{completion}\n\n"
    "Is the solution correct? Think briefly, then end with \"Score: N\", where N is an integer from 1 "
    "(certainly wrong) to 10 (certainly correct)."
)


@CRITICS.register("llm_judge")
class LLMJudgeCritic(Critic):
    batched = True

    @dataclass
    class Config:
        template: str = TEMPLATE
        system: str | None = None
        score_pattern: str = r"[Ss]core\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)"  # group 1 is the number
        scale: list[float] = field(default_factory=lambda: [1.0, 10.0])  # raw [low, high] → [0, 1]
        threshold: float = 0.7
        backend: Literal["policy", "vllm", "openai"] = "policy"
        model: str | None = None  # vllm: registered model or folder; openai: the endpoint's model name
        engine: EngineSpec = field(default_factory=lambda: EngineSpec.named("vllm"))  # vllm backend: the judge's engine
        base_url: str | None = None  # openai: e.g. http://127.0.0.1:8000/v1 (None = the client's default)
        api_key_env: str = "OPENAI_API_KEY"  # openai: the environment variable that holds the key
        request_timeout: float = 60.0
        max_retries: int = 2
        concurrency: int = 8  # openai: requests in flight
        sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_tokens=256))
        seed: int = 0

        def __post_init__(self):
            if len(self.scale) != 2 or self.scale[0] >= self.scale[1]:
                raise ValueError(f"scale must be [low, high] with low < high, got {self.scale}")
            try:
                if re.compile(self.score_pattern).groups < 1:
                    raise ValueError("score_pattern needs a group around the number")
            except re.error as err:
                raise ValueError(f"score_pattern is not a regular expression: {err}") from err
            if self.backend in ("vllm", "openai") and not self.model:
                raise ValueError(f"backend {self.backend} needs model")
            if self.sampling.n != 1:
                raise ValueError("sampling.n must be 1: the judge replies once per sample")
            if self.concurrency < 1:
                raise ValueError("concurrency must be >= 1")

    def __init__(self, config: "LLMJudgeCritic.Config", context):
        super().__init__(config, context)
        self._engine = None
        self._client = None
        if config.backend == "openai":
            key = os.environ.get(config.api_key_env)
            if not key:
                raise RuntimeError(f"llm_judge: environment variable {config.api_key_env} (api_key_env) is not set")
            import openai

            self._client = openai.OpenAI(base_url=config.base_url, api_key=key, timeout=config.request_timeout,
                                         max_retries=config.max_retries)

    def judge(self, samples: list[dict]) -> list[Verdict]:
        messages = [self.messages(s) for s in samples]
        replies = self._replies(messages)
        return [self.parse(reply) if isinstance(reply, str) else Verdict(score=None, error=str(reply))
                for reply in replies]

    def messages(self, sample: dict) -> list[dict]:
        user = self.config.template.format_map(_Columns(sample))
        system = [{"role": "system", "content": self.config.system}] if self.config.system else []
        return [*system, {"role": "user", "content": user}]

    def parse(self, reply: str) -> Verdict:
        matches = re.findall(self.config.score_pattern, reply)
        if not matches:
            return Verdict(score=None, rationale=reply, error=f"no score in the judge's reply: {reply[-200:]!r}")
        raw = float(matches[-1] if isinstance(matches[-1], str) else matches[-1][0])
        low, high = self.config.scale
        if not low <= raw <= high:  # "11/10" is not full marks: clipping it would reward gaming the judge
            return Verdict(score=None, rationale=reply,
                           error=f"judge's score {raw:g} is off its scale [{low:g}, {high:g}]: {reply[-200:]!r}")
        score = (raw - low) / (high - low)
        return Verdict(score=score, label=score >= self.config.threshold, rationale=reply)

    # -- backends --------------------------------------------------------------------------------------------
    def _replies(self, messages: list[list[dict]]) -> list[str | Exception]:
        c = self.config
        if c.backend == "openai":
            with ThreadPoolExecutor(c.concurrency) as pool:
                return list(pool.map(self._request, messages))
        engine, weights = self._local()
        outputs = engine.generate(messages, c.sampling, weights, seed=c.seed)
        return [out[0].text for out in outputs]

    def _request(self, messages: list[dict]) -> str | Exception:
        c = self.config
        try:
            response = self._client.chat.completions.create(
                model=c.model, messages=messages, temperature=c.sampling.temperature, top_p=c.sampling.top_p,
                max_tokens=c.sampling.max_tokens, stop=c.sampling.stop or None, seed=c.seed)
            return response.choices[0].message.content or ""
        except Exception as err:  # noqa: BLE001 - one failed request fails one verdict
            return RuntimeError(f"{type(err).__name__}: {err}")

    def _local(self):
        if self.config.backend == "policy":
            return self.context.engine(), self.context.weights
        if self._engine is None:
            from ..models import prepare_model

            path = str(prepare_model(self.config.model))
            self._engine = self.config.engine.build(path, seed=self.config.seed)
            self._weights = Weights(path, None, "judge")
        return self._engine, self._weights

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


class _Columns(dict):
    """The sample as template fields; a placeholder naming no column fails with the columns there are."""

    def __missing__(self, key):
        raise KeyError(f"llm_judge template field {{{key}}} is not a sample column; columns: {', '.join(sorted(self))}")
