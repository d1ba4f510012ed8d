"""The critic protocol: a batch of samples in, one verdict per sample out.

A sample is a dict holding every column of the samples dataset: `prompt` (chat messages), `completion`,
`problem_id`, the task's problem columns (`question`, `answer`, `subject`, ...), the sampling metadata, and
`verdicts`: {critic id: verdict row} of the critics that ran before it in the same critique stage (what
`combine` reads).

A critic is either
- a class with a `Config` dataclass (its YAML parameters), built as `Critic(config, context)`, whose
  `judge(samples)` returns one `Verdict` per sample; or
- a plain function `fn(samples, **params)` returning, per sample, a `Verdict`, a float score, a bool label,
  or a dict with `score`/`label`/`rationale`/`error` keys.

Either is named in YAML by its registered name, by a dotted path `package.module:Name`, or by an entry point in
the `selfimprove.critics` group.

How the critique stage calls a critic depends on two class attributes (a function may set them as attributes):
- `batched = False` (the default): called with one sample at a time (one problem's samples at a time when
  `per_problem`), each call under the stage's per-sample `timeout`; a call that raises or times out fails
  exactly those samples' verdicts.
- `batched = True` (critics that query a model and want large batches): called with `batch_size` samples,
  without a time limit (interrupting an engine mid-call could corrupt it; their own calls are bounded by
  max_tokens and request timeouts). They report per-sample failures themselves as `Verdict(error=...)`;
  if the call raises, the whole batch fails.
- `per_problem = True`: every call holds all samples of the problems it covers (majority voting needs them).
Failed verdicts are recorded and counted; the stage fails only past its `max_error_rate`.

A critic may also describe a judged batch: `stats(samples, verdicts)` returns {name: number} that the rl stage
logs per step under `<critic id>/<name>` (signal quality against gold where the data has it, for the record only).
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
    stage_weights: Callable[[str], Any] | None = None  # a stage's `weights:` name → Weights (StageContext.weights)


class Critic:
    """Base class for class-based critics."""

    batched = False  # see the module docstring
    per_problem = False

    def __init__(self, config, context: CriticContext):
        self.config = config
        self.context = context

    def judge(self, samples: list[dict]) -> list[Verdict]:
        raise NotImplementedError

    def stats(self, samples: list[dict], verdicts: list[Verdict]) -> dict[str, float | None]:
        """Per-batch metrics about the verdicts just given (module docstring); none by default."""
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
    if isinstance(value, dict):
        unknown = set(value) - {"score", "label", "rationale", "error"}
        if unknown:
            raise TypeError(f"critic returned a dict with unknown keys {sorted(unknown)}")
        return Verdict(**value)
    if value is None:  # no verdict: invalid, not a score of 0
        return Verdict(score=None, error="critic returned None")
    raise TypeError(f"critic returned {type(value).__name__}; expected Verdict, float, bool or dict")


class FunctionCritic(Critic):
    """Adapts a plain function to the class protocol; its YAML parameters become keyword arguments."""

    def __init__(self, fn: Callable, params: dict, context: CriticContext):
        super().__init__(params, context)
        self.fn = fn
        self.batched = bool(getattr(fn, "batched", False))
        self.per_problem = bool(getattr(fn, "per_problem", False))
        accepted = inspect.signature(fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        unknown = [k for k in params if k not in accepted and not takes_any]
        if unknown:
            raise ValueError(f"critic function {fn.__name__} takes no parameter(s) {unknown}")

    def judge(self, samples: list[dict]) -> list[Verdict]:
        return [as_verdict(v) for v in self.fn(samples, **self.config)]
