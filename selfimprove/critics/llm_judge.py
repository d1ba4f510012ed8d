"""LLM-as-judge: a prompt template filled from the sample's columns (`{question}`, `{completion}`, `{answer}`, any
task column: a judge may be shown the gold answer or not), a model's reply, and a parser for its score.

The last match of `score_pattern` in the reply is the raw score, mapped linearly from `scale` onto [0, 1]; label =
score >= `threshold`. A reply with no score or one off the scale (never clipped: `parse` says why), or a request
that fails, makes that sample's verdict invalid, and only that one. Replies come from the `backend`, a component
of its own (JUDGE_BACKENDS; the README's critic table lists them).
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import ConfigError
from ..models import load_spec, prepare_model
from ..records import SamplingConfig, Weights
from ..registry import CRITICS, JUDGE_BACKENDS, EngineSpec, JudgeBackendSpec
from .base import Critic, Verdict

TEMPLATE = (
    "You are grading a student's solution to a math problem.\n\n"
    "Problem:\n{question}\n\nStudent's solution:\n{completion}\n\n"
    "Is the solution correct? Think briefly, then end with \"Score: N\", where N is an integer from 1 "
    "(certainly wrong) to 10 (certainly correct)."
)


class JudgeBackend:
    """Where a judge's replies come from, built with its `Config` (if any) and the critic's context (the run's
    engine, the weights that wrote the samples). `replies(messages, sampling, seed)` returns one reply per
    conversation, or the exception that failed it (which fails that verdict only); `close()` runs after the stage."""

    def __init__(self, config, context):
        self.config, self.context = config, context

    def close(self) -> None:
        pass


@JUDGE_BACKENDS.register("policy")
class PolicyBackend(JudgeBackend):
    def replies(self, messages, sampling, seed):
        outputs = self.context.engine().generate(messages, sampling, self.context.weights, seed=seed)
        return [out[0].text for out in outputs]


@JUDGE_BACKENDS.register("vllm")
class LocalModelBackend(JudgeBackend):
    @dataclass
    class Config:
        model: str  # a registered model, a model description .yaml or a model folder
        engine: EngineSpec = field(default_factory=lambda: EngineSpec.named("vllm"))

        def __post_init__(self):
            try:  # an unknown model fails when the config loads, not after the samples are generated
                load_spec(self.model)
            except ConfigError as err:
                raise ValueError(str(err)) from None

    engine = None

    def replies(self, messages, sampling, seed):
        if self.engine is None:
            path = str(prepare_model(self.config.model))
            self.engine, self.weights = self.config.engine.build(path, seed=seed), Weights(path, None, "judge")
        return [out[0].text for out in self.engine.generate(messages, sampling, self.weights, seed=seed)]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


@JUDGE_BACKENDS.register("openai")
class OpenAIBackend(JudgeBackend):
    @dataclass
    class Config:
        model: str  # the endpoint's model name
        base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1 (None = the client's default)
        api_key_env: str = "OPENAI_API_KEY"  # the environment variable that holds the key
        request_timeout: float = 60.0
        max_retries: int = 2
        concurrency: int = 8  # requests in flight

        def __post_init__(self):
            if self.concurrency < 1:
                raise ValueError("concurrency must be >= 1")

    def __init__(self, config, context):
        super().__init__(config, context)
        key = os.environ.get(config.api_key_env)
        if not key:
            raise RuntimeError(f"llm_judge: environment variable {config.api_key_env} (api_key_env) is not set")
        import openai

        self.client = openai.OpenAI(base_url=config.base_url, api_key=key, timeout=config.request_timeout,
                                    max_retries=config.max_retries)

    def replies(self, messages, sampling, seed):
        def request(conversation: list[dict]) -> str | Exception:
            try:
                response = self.client.chat.completions.create(
                    model=self.config.model, messages=conversation, temperature=sampling.temperature,
                    top_p=sampling.top_p, max_tokens=sampling.max_tokens, stop=sampling.stop or None, seed=seed)
                return response.choices[0].message.content or ""
            except Exception as err:  # noqa: BLE001 - one failed request fails one verdict
                return RuntimeError(f"{type(err).__name__}: {err}")

        with ThreadPoolExecutor(self.config.concurrency) as pool:
            return list(pool.map(request, messages))


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
        backend: JudgeBackendSpec = field(default_factory=lambda: JudgeBackendSpec.named("policy"))
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
            if self.sampling.n != 1:
                raise ValueError("sampling.n must be 1: the judge replies once per sample")

    def __init__(self, config: "LLMJudgeCritic.Config", context):
        super().__init__(config, context)
        self.backend = config.backend.build(context)

    def judge(self, samples: list[dict]) -> list[Verdict]:
        replies = self.backend.replies([self.messages(s) for s in samples], self.config.sampling, self.config.seed)
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

    def close(self) -> None:
        self.backend.close()


class _Columns(dict):
    """The sample as template fields; a placeholder naming no column fails with the columns there are."""

    def __missing__(self, key):
        raise KeyError(f"llm_judge template field {{{key}}} is not a sample column; columns: {', '.join(sorted(self))}")
