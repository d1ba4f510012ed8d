"""The engine interface: prompts and weights in, completions out.

An engine serves one base model and, per call, the weights a stage asks for: the base itself or a PEFT
adapter trained on it. How an adapter reaches the model (per-request LoRA, or merged weights loaded into the
running engine) is the engine's business, chosen by its config with a per-device default; stages never see it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

Message = dict  # {"role": ..., "content": ...}
Prompt = Union[list[Message], str]  # chat messages (the chat template is applied) or raw text


@dataclass(frozen=True)
class Weights:
    """A policy: the base model folder plus, optionally, a PEFT adapter folder trained on it."""

    base: str
    adapter: str | None = None
    label: str = "base"  # human-readable lineage, e.g. "round_001/train"

    @property
    def key(self) -> str:
        return self.adapter or self.base

    def to_dict(self) -> dict:
        return {"base": self.base, "adapter": self.adapter, "label": self.label}


@dataclass
class SamplingConfig:
    """How to sample; the fields every generating stage exposes."""

    n: int = 1  # samples per prompt
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"n={self.n} samples with temperature 0 would be {self.n} copies of one greedy answer")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    num_tokens: int


class Engine:
    """Base class of engines. `generate` returns, per prompt, `sampling.n` completions.

    `seed` makes sampled generations reproducible: the same prompts, sampling, weights and seed give the same
    completions on the same engine configuration (bitwise in float32 on CPU; see PLATFORM notes).
    """

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig, weights: Weights, seed: int) -> list[list[Completion]]:
        raise NotImplementedError

    def choice_logprobs(self, prompts: list[Prompt], choices: list[str], weights: Weights) -> list[dict[str, float]]:
        """Per prompt, {choice: log-probability that the model continues the prompt with exactly that text}.

        A choice's tokens are appended to the prompt's tokens (chat prompts get the chat template with the
        generation prompt, so a choice is scored as the start of the assistant's reply) and their log-probabilities
        are summed. Critics read P("Yes") from it (self-verification, yes/no judges); nothing is sampled.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement choice_logprobs")

    def close(self) -> None:
        pass


def adapter_hash(adapter_dir: str | Path) -> str:
    """Short content hash of an adapter's weights, to tell versions apart and to name merged folders."""
    digest = hashlib.sha256()
    for file in sorted(Path(adapter_dir).glob("*.safetensors")):
        digest.update(file.read_bytes())
    cfg = Path(adapter_dir) / "adapter_config.json"
    if cfg.exists():
        digest.update(json.dumps(json.loads(cfg.read_text()), sort_keys=True).encode())
    return digest.hexdigest()[:16]
