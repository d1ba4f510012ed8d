"""Critique: every critic judges every sample of a generate stage; one verdict row per (sample, critic).

A critic that raises on a batch does not stop the run: each sample of that batch gets a verdict with the
error (score and label None), and the stage fails only when the share of errored verdicts passes
`max_error_rate`.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

from ..artifacts import load_rows, save_rows
from ..critics import CriticContext, Verdict, resolve_critic
from ..registry import STAGES
from .base import Stage


@STAGES.register("critique")
class Critique(Stage):
    @dataclass
    class Config:
        samples: str = "generate"  # the generate stage whose samples are judged
        critics: list[dict] = field(default_factory=lambda: [{"name": "answer"}])
        batch_size: int = 256
        max_error_rate: float = 0.05

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.samples]

    def run(self) -> dict:
        ctx = self.ctx
        samples = load_rows(ctx.input_dir(self.config.samples) / "data")
        context = CriticContext(task=ctx.task, engine=ctx.engine, weights=ctx.weights("policy"))
        rows, errors, metrics = [], 0, {}
        for i, spec in enumerate(self.config.critics):
            resolved = resolve_critic(spec, "pipeline", f"stages.{ctx.stage}.critics[{i}]")
            critic = resolved.build(context)
            labelled = 0
            for start in range(0, len(samples), self.config.batch_size):
                batch = samples[start:start + self.config.batch_size]
                verdicts = _judge(critic, batch)
                for sample, verdict in zip(batch, verdicts):
                    errors += verdict.error is not None
                    labelled += bool(verdict.label)
                    rows.append({
                        "sample_id": sample["sample_id"], "problem_id": sample["problem_id"], "critic": resolved.id,
                        "score": verdict.score, "label": verdict.label, "rationale": verdict.rationale,
                        "error": verdict.error,
                    })
            metrics[f"{resolved.id}/positive"] = labelled
            metrics[f"{resolved.id}/positive_rate"] = labelled / len(samples) if samples else 0.0
        rate = errors / len(rows) if rows else 0.0
        if rate > self.config.max_error_rate:
            raise RuntimeError(
                f"stage {ctx.stage}: {errors}/{len(rows)} verdicts failed ({rate:.1%} > max_error_rate "
                f"{self.config.max_error_rate:.1%}); first error: {next(r['error'] for r in rows if r['error'])}"
            )
        save_rows(rows, ctx.out_dir / "data")
        return {"samples": len(samples), "verdicts": len(rows), "errors": errors, **metrics}


def _judge(critic, batch: list[dict]) -> list[Verdict]:
    try:
        verdicts = list(critic.judge(batch))
        if len(verdicts) != len(batch):
            raise ValueError(f"critic returned {len(verdicts)} verdicts for {len(batch)} samples")
        return verdicts
    except Exception as err:  # noqa: BLE001 - a critic's failure is recorded per sample, not fatal
        message = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
        return [Verdict(score=None, label=None, error=message) for _ in batch]
