"""The critic protocol: a batch of samples in, one verdict per sample out.

A sample is a dict holding every column of the samples dataset: `prompt` (chat messages), `completion`,
`problem_id`, the task's problem columns (`question`, `answer`, ...), and the sampling metadata.

A critic is either
- a class with a `Config` dataclass (its YAML parameters), built as `Critic(config, context)`, whose
  `judge(samples)` returns one `Verdict` per sample; or
- a plain function `fn(samples, **params)` returning, per sample, a `Verdict`, a float score, a bool label,
  or a dict with `score`/`label`/`rationale` keys.

Either is named in YAML by its registered name, by a dotted path `package.module:Name`, or by an entry point in
the `selfimprove.critics` group. A critic that raises on a batch has every sample of that batch recorded
with the error rather than stopping the run (see the critique stage).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Verdict:
    score: float | None  # higher is better; None when the critic could not judge the sample
    label: bool | None = None  # correct / incorrect, when the critic decides one
    rationale: str | None = None
    error: str | None = None


@dataclass
class CriticContext:
    """What a critic may use besides the samples: the task (graders), and the policy engine for critics that
    query a model."""

    task: Any
    engine: Callable[[], Any] | None = None  # lazily built; call it to get the engine
    weights: Any = None  # the weights the samples were generated with


class Critic:
    """Base class for class-based critics."""

    def __init__(self, config, context: CriticContext):
        self.config = config
        self.context = context

    def judge(self, samples: list[dict]) -> list[Verdict]:
        raise NotImplementedError


def as_verdict(value: Any) -> Verdict:
    """Normalise what a function critic returns for one sample."""
    if isinstance(value, Verdict):
        return value
    if isinstance(value, bool):
        return Verdict(score=float(value), label=value)
    if isinstance(value, (int, float)):
        return Verdict(score=float(value))
    if isinstance(value, dict):
        unknown = set(value) - {"score", "label", "rationale", "error"}
        if unknown:
            raise TypeError(f"critic returned a dict with unknown keys {sorted(unknown)}")
        return Verdict(**value)
    if value is None:
        return Verdict(score=None)
    raise TypeError(f"critic returned {type(value).__name__}; expected Verdict, float, bool or dict")


class FunctionCritic(Critic):
    """Adapts a plain function to the class protocol; its YAML parameters become keyword arguments."""

    def __init__(self, fn: Callable, params: dict, context: CriticContext):
        super().__init__(params, context)
        self.fn = fn
        accepted = inspect.signature(fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = [k for k in params if k not in accepted and not takes_any]
        if unknown:
            raise ValueError(f"critic function {fn.__name__} takes no parameter(s) {unknown}")

    def judge(self, samples: list[dict]) -> list[Verdict]:
        out = self.fn(samples, **self.config)
        return [as_verdict(v) for v in out]
