"""The engine interface: prompts and weights in, completions out.

An engine serves one base model and, per call, the weights a stage asks for: the base itself or a PEFT
adapter trained on it. How an adapter reaches the model (per-request LoRA, or merged weights loaded into the
running engine) is the engine's business, chosen by its config with a per-device default; stages never see it.
"""

from __future__ import annotations

import hashlib

from ..records import Completion, Prompt, SamplingConfig, Weights

__all__ = ["Engine", "request_seed"]


class Engine:
    """Base class of engines. `generate` returns, per prompt, `sampling.n` completions.

    `seed` makes sampled generations reproducible: the same prompts, sampling, weights and seed give the same
    completions on the same engine configuration (bitwise in float32 on CPU; docs/cpu.md). The vLLM engines give
    each prompt its own seed (`request_seed`), so that its samples do not depend on how the engine batched it.
    """

    # Whether the runner may close this engine while a stage trains offline (`Stage.trains_offline`) and start a
    # fresh one when a later stage generates: memory for training, at the price of one engine start.
    release_for_training = False

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig, weights: Weights, seed: int) -> list[list[Completion]]:
        raise NotImplementedError

    def choice_logprobs(self, prompts: list[Prompt], choices: list[str], weights: Weights) -> list[dict[str, float]]:
        """Per prompt, {choice: log-probability that the model continues the prompt with exactly that text}.

        A choice's tokens are appended to the prompt's tokens (chat prompts get the chat template with the
        generation prompt, so a choice is scored as the start of the assistant's reply) and their log-probabilities
        are summed. Critics read P("Yes") from it (self-verification, yes/no judges); nothing is sampled.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement choice_logprobs")

    def prepare(self, weights: Weights) -> None:
        """Get `weights` ready to serve before the next call needs them (an engine that merges adapters merges
        here), so that a caller can time the weight update apart from generation. Optional: `generate` does
        whatever is still needed."""

    def close(self) -> None:
        pass


def request_seed(seed: int, index: int) -> int:
    """The seed of a call's `index`-th prompt: a hash, so that neighbouring prompts and calls do not get
    overlapping seed ranges (vLLM seeds a request's n samples from consecutive values)."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2  # non-negative int64 with room for the + sample index
