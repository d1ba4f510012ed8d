"""Calling a critic over many samples: batching, time limits, per-sample failures and the error budget.

Every stage that judges samples (critique, rl) calls critics through `judge_all`, so a critic behaves the same
wherever it runs; the rules, set by the critic's class attributes, are docs/critics.md. Samples are judged with
the weights that produced them: a sample's `weights` record becomes `context.weights` (self-verification and
policy judges query exactly the policy that wrote the sample).
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
    # samples grouped by the weights that produced them (a hashable form of the record)
    keys = (tuple(sorted(w.items())) if isinstance(w := s.get("weights"), dict) else None for s in samples)
    for weights, members in positions_by(keys).items():
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


def positions_by(keys) -> dict:
    """Positions grouped by their key, in order."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _calls(critic, samples: list[dict], batch_size: int) -> list[list[int]]:
    if critic.per_problem or critic.batched:
        units = list(positions_by(s["problem_id"] for s in samples).values())
    else:
        units = [[i] for i in range(len(samples))]
    if not critic.batched:
        return units
    calls: list[list[int]] = []
    for unit in units:  # pack whole units (problems) into calls of about batch_size samples
        if calls and len(calls[-1]) + len(unit) <= batch_size:
            calls[-1].extend(unit)
        else:
            calls.append(list(unit))
    return calls


def _call(critic, batch: list[dict], limit: float | None) -> tuple[list[Verdict], bool]:
    try:
        verdicts = [as_verdict(v) for v in call_with_timeout(limit, critic.judge, batch)]
        if len(verdicts) != len(batch):
            raise ValueError(f"critic returned {len(verdicts)} verdicts for {len(batch)} samples")
        return [v if v.score is None or math.isfinite(float(v.score))
                else Verdict(score=None, rationale=v.rationale, error=f"critic returned score {v.score}")
                for v in verdicts], False
    except Exception as err:  # noqa: BLE001 - a critic's failure is recorded per sample, not fatal
        timed_out = isinstance(err, TimedOut)
        message = f"timed out: no verdict within {limit:g}s" if timed_out else f"{type(err).__name__}: {err}"
        return [Verdict(score=None, error=message) for _ in batch], timed_out
