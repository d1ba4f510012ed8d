"""The critic protocol: a batch of samples in, one verdict per sample out.

A critic is a `Critic` subclass (`judge(samples) -> list[Verdict]`) or a plain function adapted by
`FunctionCritic`. What a sample holds and how the critique stage calls a critic (`batched`, `per_problem`,
timeouts, `stats`) is docs/critics.md.
"""

from __future__ import annotations

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
    stage_weights: Callable[[str], Any] | None = None  # a stage's `weights:` name → Weights (StageContext.weights)


class Critic:
    """Base class for class-based critics."""

    batched = False  # how the critique stage calls it: docs/critics.md
    per_problem = False

    def __init__(self, config, context: CriticContext):
        self.config = config
        self.context = context

    def judge(self, samples: list[dict]) -> list[Verdict]:
        raise NotImplementedError

    def stats(self, samples: list[dict], verdicts: list[Verdict]) -> dict[str, float | None]:
        """Per-batch metrics about the verdicts just given (docs/critics.md); none by default."""
        return {}

    def close(self) -> None:
        """Release what the critic holds (a judge's own engine, a reward model); called after the stage."""


def as_verdict(value: Any) -> Verdict:
    """Normalise what a function critic returns for one sample."""
    if isinstance(value, Verdict):
        return value
    if isinstance(value, bool):
        return Verdict(score=float(value), label=value)
    if isinstance(value, (int, float)):
        return Verdict(score=float(value))
    if isinstance(value, dict):  # a key Verdict lacks is a TypeError naming it
        return Verdict(**value)
    if value is None:  # no verdict: invalid, not a score of 0
        return Verdict(score=None, error="critic returned None")
    raise TypeError(f"critic returned {type(value).__name__}; expected Verdict, float, bool or dict")


class FunctionCritic(Critic):
    """Adapts a plain function to the class protocol; its YAML parameters (checked against its signature by
    registry.CriticSpec) become keyword arguments."""

    def __init__(self, fn: Callable, params: dict, context: CriticContext):
        super().__init__(params, context)
        self.fn = fn
        self.batched = bool(getattr(fn, "batched", False))
        self.per_problem = bool(getattr(fn, "per_problem", False))

    def judge(self, samples: list[dict]) -> list[Verdict]:
        return [as_verdict(v) for v in self.fn(samples, **self.config)]
