"""Critique: every critic judges every sample of a generate stage; one verdict row per (sample, critic).

Critics run in the order listed; each sees, in `sample["verdicts"]`, the verdicts of the critics before it
(`combine` builds on them). How a critic is called (see critics/base.py):
- unbatched critics (the default): one sample at a time, or one problem's samples for `per_problem` critics,
  each call under `timeout` seconds per sample;
- batched critics (model-backed): `batch_size` samples per call, whole problems per call, no time limit.
A call that raises or times out fails the verdicts of the samples it held (score and label None, the error
recorded); the stage fails only when more than `max_error_rate` of one critic's verdicts failed.

Critic quality: when `quality` is on and samples carry gold answers, each sample is also graded by the task
(task.grade, the same grader as evaluation) and each critic's precision, recall and AUROC against that gold are
reported as `<critic>/precision`, `<critic>/recall`, `<critic>/auroc` (see critics/quality.py), every round.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from ..artifacts import load_rows, save_rows
from ..config import ConfigError
from ..critics import CriticContext, Verdict, resolve_critic
from ..critics.base import as_verdict
from ..critics.quality import critic_quality
from ..registry import STAGES
from ..timeouts import TimedOut, call_with_timeout
from .base import Stage

log = logging.getLogger(__name__)


@STAGES.register("critique")
class Critique(Stage):
    @dataclass
    class Config:
        samples: str = "generate"  # the generate stage whose samples are judged
        critics: list[dict] = field(default_factory=lambda: [{"name": "answer"}])
        batch_size: int = 256  # samples per call of a batched critic, rounded up to whole problems
        timeout: float | None = 60.0  # seconds per sample for unbatched critics; None = no limit
        max_error_rate: float = 0.05  # per critic: the share of failed verdicts that fails the stage
        quality: bool = True  # report each critic's precision/recall/AUROC against gold answers, where present

        def __post_init__(self):
            if not self.critics:
                raise ValueError("critics: name at least one critic")
            if self.batch_size < 1:
                raise ValueError("batch_size must be >= 1")
            if self.timeout is not None and self.timeout <= 0:
                raise ValueError("timeout must be > 0 seconds (or null for no limit)")
            if not 0.0 <= self.max_error_rate <= 1.0:
                raise ValueError("max_error_rate must be in [0, 1]")

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.samples]

    @classmethod
    def check(cls, config, where: str, key: str) -> None:
        """Critic ids are unique, and a critic that combines others names critics listed before it."""
        ids: list[str] = []
        for i, spec in enumerate(config.critics):
            where_key = f"{key}.critics[{i}]"
            resolved = resolve_critic(spec, where, where_key)
            if resolved.id in ids:
                raise ConfigError(f"{where}: {where_key}: critic id {resolved.id!r} is used twice; give one an `id:`")
            references = getattr(resolved.params, "references", None)
            for ref in references() if callable(references) else []:
                if ref not in ids:
                    raise ConfigError(f"{where}: {where_key}: refers to critic {ref!r}, which does not run before it "
                                      f"in this stage; earlier critics: {', '.join(ids) or '(none)'}")
            ids.append(resolved.id)

    def run(self) -> dict:
        ctx, c = self.ctx, self.config
        samples = load_rows(ctx.input_dir(c.samples) / "data")
        context = CriticContext(task=ctx.task, engine=ctx.engine, weights=ctx.weights("policy"))
        gold = self._gold(samples) if c.quality else [None] * len(samples)
        earlier: dict[str, dict] = defaultdict(dict)  # sample id → {critic id: verdict row}
        rows: list[dict] = []
        metrics: dict = {"samples": len(samples)}
        if any(g is not None for g in gold):
            known = [g for g in gold if g is not None]
            metrics["gold_accuracy"] = sum(known) / len(known)
        for i, spec in enumerate(c.critics):
            resolved = resolve_critic(spec, "pipeline", f"stages.{ctx.stage}.critics[{i}]")
            critic = resolved.build(context)
            try:
                inputs = [{**s, "verdicts": dict(earlier[s["sample_id"]])} for s in samples]
                verdicts, timeouts = judge_all(critic, inputs, c.batch_size, c.timeout)
            finally:
                critic.close()
            critic_rows = [{
                "sample_id": s["sample_id"], "problem_id": s["problem_id"], "critic": resolved.id,
                "score": None if v.score is None else float(v.score), "label": None if v.label is None else bool(v.label),
                "rationale": v.rationale, "error": v.error,
            } for s, v in zip(samples, verdicts)]
            for s, row in zip(samples, critic_rows):
                earlier[s["sample_id"]][resolved.id] = row
            rows.extend(critic_rows)
            metrics.update(critic_metrics(resolved.id, critic_rows, gold, timeouts))
            self._check_errors(resolved.id, critic_rows)
        save_rows(rows, ctx.out_dir / "data")
        metrics.update(verdicts=len(rows), errors=sum(r["error"] is not None for r in rows))
        return metrics

    def _gold(self, samples: list[dict]) -> list[bool | None]:
        """task.grade's verdict where the sample has a gold answer; None where it has none or grading failed."""
        out: list[bool | None] = []
        for s in samples:
            if not s.get("answer"):
                out.append(None)
                continue
            try:
                out.append(bool(call_with_timeout(self.config.timeout, self.ctx.task.grade, s, s["completion"]).correct))
            except Exception as err:  # noqa: BLE001 - TimedOut included; such a sample just has no gold
                log.warning("gold grading failed on %s: %s", s["sample_id"], err)
                out.append(None)
        return out

    def _check_errors(self, critic_id: str, rows: list[dict]) -> None:
        failed = [r for r in rows if r["error"] is not None]
        rate = len(failed) / len(rows) if rows else 0.0
        if rate > self.config.max_error_rate:
            raise RuntimeError(
                f"stage {self.ctx.stage}: critic {critic_id!r} failed on {len(failed)}/{len(rows)} samples "
                f"({rate:.1%} > max_error_rate {self.config.max_error_rate:.1%}); first error: {failed[0]['error']}"
            )


def judge_all(critic, samples: list[dict], batch_size: int, timeout: float | None) -> tuple[list[Verdict], int]:
    """One verdict per sample (in order) and the number of calls that timed out."""
    units = _units(samples, critic.per_problem or critic.batched)
    calls: list[list[int]] = []
    if critic.batched:
        for unit in units:  # pack whole units (problems) into calls of about batch_size samples
            if calls and len(calls[-1]) + len(unit) <= batch_size:
                calls[-1].extend(unit)
            else:
                calls.append(list(unit))
    else:
        calls = units
    verdicts: list[Verdict | None] = [None] * len(samples)
    timeouts = 0
    for call in calls:
        limit = None if critic.batched or timeout is None else timeout * len(call)
        out, timed_out = _call(critic, [samples[i] for i in call], limit)
        timeouts += timed_out
        for i, v in zip(call, out):
            verdicts[i] = v
    return verdicts, timeouts


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
        return verdicts, False
    except TimedOut:
        message = f"timed out: no verdict within {limit:g}s"
        return [Verdict(score=None, label=None, error=message) for _ in batch], True
    except Exception as err:  # noqa: BLE001 - a critic's failure is recorded per sample, not fatal
        message = f"{type(err).__name__}: {err}"
        return [Verdict(score=None, label=None, error=message) for _ in batch], False


def critic_metrics(critic_id: str, rows: list[dict], gold: list[bool | None], timeouts: int) -> dict:
    """Counts for one critic, plus its quality against gold where gold is known."""
    n = len(rows)
    failed = sum(r["error"] is not None for r in rows)
    positive = sum(bool(r["label"]) for r in rows)
    out = {f"{critic_id}/positive": positive, f"{critic_id}/positive_rate": positive / n if n else 0.0,
           f"{critic_id}/errors": failed, f"{critic_id}/timeouts": timeouts}
    judged = [(r, g) for r, g in zip(rows, gold) if g is not None and r["error"] is None]
    if judged:
        quality = critic_quality([r["label"] for r, _ in judged], [r["score"] for r, _ in judged],
                                 [g for _, g in judged])
        out.update({f"{critic_id}/{k}": quality[k] for k in ("precision", "recall", "auroc")})
        out[f"{critic_id}/quality_n"] = quality["n"]
    return out
