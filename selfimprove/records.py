"""The records every layer shares: prompts, weights identity, sampling settings, completions, RL rollouts, and the row
schemas of the datasets a run writes. Nothing here imports from the rest of the package, so tasks, engines,
critics, trainers and stages can all depend on it without depending on each other.

Row schemas (each a Hugging Face `datasets` row, written by the stage named):
- sample (generate, evaluate, rl rollouts): the problem's columns, then `sample_id`, `round`, `stage`, `index`,
  `weights` (the full `Weights` record of the policy that produced it), `seed`, `temperature`, `top_p`,
  `max_tokens`, `hint`, `prompt`, `completion`, `finish_reason`, `num_tokens`, `token_ids` (the sampled tokens,
  where the engine reports them), `logprobs` (the sampler's log-probability of each); samples of several
  attempts also carry `attempts` (stages/rollout.py), with `completion` = the last attempt's.
- verdict (critique): `sample_id`, `problem_id`, `critic` (the critic's id), `score`, `label`, `rationale`, `error`.
- training row (filter): `prompt`, `completion` (one assistant message), `problem_id`, `sample_ids`, `source`,
  `rationalized`.
- pair (pairs, spin_pairs): `prompt`, `chosen`, `rejected` (one assistant message each), `problem_id`,
  `chosen_sample_id`, `rejected_sample_id`, `chosen_score`, `rejected_score`, `round`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

Message = dict  # {"role": ..., "content": ...}
Prompt = Union[list[Message], str]  # chat messages (the chat template is applied) or raw text


def reply(prompt: Prompt, text: str) -> Prompt:
    """`text` as the completion of `prompt` in a training row (SFT's `completion`, DPO's `chosen`/`rejected`):
    plain text after a text prompt, one assistant message after chat messages, the two forms TRL's trainers take."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def adapter_hash(adapter_dir: str | Path) -> str:
    """Content hash of an adapter: its weight files and its config, independent of how either was written.

    PEFT writes `target_modules` in set order, which changes from process to process; lists in the config are
    hashed sorted, so two bitwise-identical adapters always get the same hash."""
    digest = hashlib.sha256()
    for file in sorted(Path(adapter_dir).glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    cfg = Path(adapter_dir) / "adapter_config.json"
    if cfg.exists():
        digest.update(json.dumps(canonical(json.loads(cfg.read_text())), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def canonical(value):
    """A JSON value with every list of strings sorted (PEFT's `target_modules` is written in set order)."""
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return sorted(value) if all(isinstance(v, str) for v in value) else [canonical(v) for v in value]
    return value


@dataclass(frozen=True)
class Weights:
    """A policy: the base model folder plus, optionally, a PEFT adapter folder trained on it.

    `adapter_hash` is the adapter's content hash (None for the base): what identifies the weights that produced a
    sample, whatever folder they sit in."""

    base: str
    adapter: str | None = None
    label: str = "base"  # human-readable lineage, e.g. "round_001/train"
    adapter_hash: str | None = None

    @classmethod
    def of(cls, base: str, adapter: str | None = None, label: str = "base") -> "Weights":
        """Weights with their adapter's hash computed from the folder."""
        return cls(base, adapter, label, adapter_hash(adapter) if adapter else None)

    def to_dict(self) -> dict:
        return {"base": self.base, "adapter": self.adapter, "label": self.label, "adapter_hash": self.adapter_hash}

    @classmethod
    def from_dict(cls, record: dict) -> "Weights":
        return cls(record["base"], record.get("adapter"), record.get("label", "base"), record.get("adapter_hash"))


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

    def stopping_at(self, stop: tuple[str, ...]) -> SamplingConfig:
        """This sampling, also stopping at `stop` (a task's `Task.stop`), each string once."""
        extra = [s for s in stop if s not in self.stop]
        return replace(self, stop=[*self.stop, *extra]) if extra else self


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" or "length"
    num_tokens: int
    token_ids: list[int] | None = None  # the sampled tokens, where the engine reports them
    # The sampler's log-probability of each sampled token, under the distribution it sampled from (after
    # temperature), where the engine reports it: what the RL trainer measures its own log-probabilities against.
    logprobs: list[float] | None = None


@dataclass
class Rollout:
    """One trajectory (one or more attempts) ready for a policy-gradient update: built by the rl stage, consumed by
    its trainer (trainers/rl.py)."""

    group: str  # rollouts of one group (one problem) share a baseline
    prompts: list[Prompt]  # the prompt of each attempt; attempt t's prompt contains the attempts before it
    completions: list[str]
    eos: list[bool]  # whether each attempt ended with the end-of-sequence token (the text does not hold it)
    rewards: list[float | None]  # per attempt, from the objective (None: no reward term on that attempt)
    version: str  # hash of the adapter the rollout was sampled with
    token_ids: list[list[int] | None] | None = None  # per attempt, the tokens the engine sampled (when reported)
    logprobs: list[list[float] | None] | None = None  # per attempt, the engine's log-probability of each of them
