"""Calling a critic over many samples: batching, time limits, per-sample failures and the error budget.

Every stage that judges samples (critique, rl) calls critics through `judge_all`, so a critic behaves the same
wherever it runs. How a critic is called depends on its class attributes (see base.py):
- unbatched critics (the default): one sample at a time, or one problem's samples for `per_problem` critics,
  each call under `timeout` seconds per sample;
- batched critics (model-backed): `batch_size` samples per call, whole problems per call, no time limit
  (interrupting an engine mid-call could corrupt it; their own calls are bounded by max_tokens and timeouts).
A call that raises, times out, returns the wrong number of verdicts or a NaN score fails the verdicts of the
samples it held (score and label None, the error recorded); `check_error_budget` fails the stage only when
more than `max_error_rate` of one critic's verdicts failed.

Samples are judged with the weights that produced them: a sample's `weights` record is handed to the critic as
`context.weights` (self-verification and policy judges query exactly the policy that wrote the sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..records import Weights
from ..timeouts import TimedOut, call_with_timeout
from .base import Verdict, as_verdict


@dataclass
class CriticCalls:
    """How a stage calls its critics."""

    batch_size: int = 256  # samples per call of a batched critic, rounded up to whole problems
    timeout: float | None = 60.0  # seconds per sample for unbatched critics; None = no limit
    max_error_rate: float = 0.05  # per critic: the share of failed verdicts that fails the stage

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be > 0 seconds (or null for no limit)")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError("max_error_rate must be in [0, 1]")


def judge_all(critic, samples: list[dict], calls: CriticCalls) -> tuple[list[Verdict], int]:
    """One verdict per sample (in order) and the number of calls that timed out."""
    verdicts: list[Verdict | None] = [None] * len(samples)
    timeouts = 0
    for weights, members in _by_weights(samples).items():
        if weights is not None and critic.context is not None:
            critic.context.weights = Weights.from_dict(dict(weights))
        for call in _calls(critic, [samples[i] for i in members], calls.batch_size):
            limit = None if critic.batched or calls.timeout is None else calls.timeout * len(call)
            out, timed_out = _call(critic, [samples[members[i]] for i in call], limit)
            timeouts += timed_out
            for i, v in zip(call, out):
                verdicts[members[i]] = v
    return verdicts, timeouts


def check_error_budget(stage: str, critic_id: str, verdicts: list[Verdict], calls: CriticCalls) -> None:
    failed = [v for v in verdicts if v.error is not None]
    rate = len(failed) / len(verdicts) if verdicts else 0.0
    if rate > calls.max_error_rate:
        raise RuntimeError(
            f"stage {stage}: critic {critic_id!r} failed on {len(failed)}/{len(verdicts)} samples "
            f"({rate:.1%} > max_error_rate {calls.max_error_rate:.1%}); first error: {failed[0].error}"
        )


def _by_weights(samples: list[dict]) -> dict:
    """Sample positions grouped by the weights that produced them (a hashable form of the record), in order."""
    groups: dict = {}
    for i, s in enumerate(samples):
        w = s.get("weights")
        key = tuple(sorted(w.items())) if isinstance(w, dict) else None
        groups.setdefault(key, []).append(i)
    return groups


def _calls(critic, samples: list[dict], batch_size: int) -> list[list[int]]:
    units = _units(samples, critic.per_problem or critic.batched)
    if not critic.batched:
        return units
    calls: list[list[int]] = []
    for unit in units:  # pack whole units (problems) into calls of about batch_size samples
        if calls and len(calls[-1]) + len(unit) <= batch_size:
            calls[-1].extend(unit)
        else:
            calls.append(list(unit))
    return calls


def _units(samples: list[dict], per_problem: bool) -> list[list[int]]:
    if not per_problem:
        return [[i] for i in range(len(samples))]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s["problem_id"], []).append(i)
    return list(groups.values())


def _call(critic, batch: list[dict], limit: float | None) -> tuple[list[Verdict], bool]:
    try:
        verdicts = [as_verdict(v) for v in call_with_timeout(limit, critic.judge, batch)]
        if len(verdicts) != len(batch):
            raise ValueError(f"critic returned {len(verdicts)} verdicts for {len(batch)} samples")
        return [_nan_checked(v) for v in verdicts], False
    except TimedOut:
        message = f"timed out: no verdict within {limit:g}s"
        return [Verdict(score=None, label=None, error=message) for _ in batch], True
    except Exception as err:  # noqa: BLE001 - a critic's failure is recorded per sample, not fatal
        message = f"{type(err).__name__}: {err}"
        return [Verdict(score=None, label=None, error=message) for _ in batch], False


def _nan_checked(v: Verdict) -> Verdict:
    if v.score is not None and not math.isfinite(float(v.score)):
        return Verdict(score=None, label=None, rationale=v.rationale, error=f"critic returned score {v.score}")
    return v
