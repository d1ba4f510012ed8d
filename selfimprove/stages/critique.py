"""Critique: every critic judges every sample of a generate stage; one verdict row per (sample, critic).

Critics run in the order listed; each sees, in `sample["verdicts"]`, the verdicts of the critics before it
(`combine` builds on them). How a critic is called, with which weights, and when its failures fail the stage, is
critics/calls.py. Resumable: verdicts are saved per critic and per chunk of problems (`shards/`).

Invalid verdicts and critic quality are as the README's *Critics built in* says: counted per critic as
`<critic>/invalid` (of which `<critic>/timeouts`) and in total as `invalid`; a critic with scores but no labels
(`<critic>/unlabelled`) is warned about; with `quality` on, samples with gold are also graded by the task, and
each critic's precision, recall and AUROC with its DeLong interval against that gold are reported (quality.py).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from tqdm import tqdm

from ..artifacts import load_rows, save_rows
from ..critics import CriticContext, Verdict
from ..critics.calls import CriticCalls, check_error_budget, judge_all
from ..critics.quality import critic_quality
from ..registry import STAGES, CriticSpec
from ..timeouts import call_with_timeout
from .base import Stage, gold_critics
from .common import Chunking, check_critic_weights

log = logging.getLogger(__name__)


@STAGES.register("critique")
class Critique(Stage):
    @dataclass
    class Config:
        samples: str = "generate"  # the generate stage whose samples are judged
        critics: list[CriticSpec] = field(default_factory=lambda: [CriticSpec.named("answer")])
        calls: CriticCalls = field(default_factory=CriticCalls)
        chunking: Chunking = field(default_factory=Chunking)
        quality: bool = True  # report each critic's precision/recall/AUROC against gold answers, where present

        def __post_init__(self):
            if not self.critics:
                raise ValueError("critics: name at least one critic")
            ids: list[str] = []
            for critic in self.critics:
                if critic.id in ids:
                    raise ValueError(f"critic id {critic.id!r} is used twice; give one an `id:`")
                references = getattr(critic.config, "references", None)
                for ref in references() if callable(references) else []:
                    if ref not in ids:
                        raise ValueError(f"critic {critic.id!r} refers to critic {ref!r}, which does not run before "
                                         f"it in this stage; earlier critics: {', '.join(ids) or '(none)'}")
                ids.append(critic.id)

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.samples]

    @classmethod
    def check(cls, config, earlier: dict) -> None:
        check_critic_weights(config.critics, earlier)

    @classmethod
    def needs_gold(cls, config) -> str | None:
        ids = gold_critics(config.critics)
        if ids:
            return (f"take critic {ids} out of critics: (it grades against gold), leaving label-free ones (majority, "
                    f"likelihood, self_verify, ...)")
        return None

    @classmethod
    def critic_ids(cls, config) -> list[str]:
        """The ids its verdicts are filed under (what a filter's or pairs stage's `critic:` names)."""
        return [critic.id for critic in config.critics]

    def run(self) -> dict:
        ctx, c = self.ctx, self.config
        samples = load_rows(ctx.input_dir(c.samples) / "data")
        gold = [self._gold(s) for s in samples] if c.quality else [None] * len(samples)
        chunks = c.chunking.split(sorted({s["problem_id"] for s in samples}))
        earlier: dict[str, dict] = defaultdict(dict)  # sample id → {critic id: verdict row}
        rows: list[dict] = []
        metrics: dict = {"samples": len(samples)}
        known = [g for g in gold if g is not None]
        if known:
            metrics["gold_accuracy"] = sum(known) / len(known)
        for i, spec in enumerate(c.critics):
            critic_rows, timeouts = self._judge(i, spec, samples, chunks, earlier)
            for row in critic_rows:
                earlier[row["sample_id"]][spec.id] = row
            rows.extend(critic_rows)
            metrics.update(critic_metrics(spec.id, critic_rows, gold, timeouts))
            if metrics[f"{spec.id}/unlabelled"] and not metrics[f"{spec.id}/positive"]:
                log.warning("critic %s gives scores without labels: a filter selecting by label keeps nothing from "
                            "it; set `min_score:` on the filter", spec.id)
            check_error_budget(ctx.stage, spec.id,
                               [Verdict(r["score"], r["label"], error=r["error"]) for r in critic_rows], c.calls)
        save_rows(rows, ctx.out_dir / "data")
        metrics.update(verdicts=len(rows), invalid=sum(r["error"] is not None for r in rows))
        return metrics

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        """Per critic: samples labelled correct and invalid verdicts (report.md's critic statistics)."""
        critics = [k[: -len("/positive")] for k in metrics if k.endswith("/positive")]
        return {f"{critic} positive / invalid": f"{metrics[f'{critic}/positive']} / {metrics[f'{critic}/invalid']}"
                for critic in critics}

    def _judge(self, index: int, spec: CriticSpec, samples: list[dict], chunks: list[list[str]],
               earlier: dict) -> tuple[list[dict], int]:
        """One critic's verdict rows over every sample, chunk by chunk, each chunk saved as a resume point."""
        ctx, c = self.ctx, self.config
        critic, rows, timeouts = None, [], 0
        bar = tqdm(total=len(samples), desc=f"round {ctx.round} {ctx.stage} {spec.id}", unit="sample", leave=False)
        try:
            for k, problem_ids in enumerate(chunks):
                shard = ctx.out_dir / "shards" / f"{index:02d}-{k:05d}"
                if shard.exists():  # finished before an interruption
                    chunk_rows = load_rows(shard)
                else:
                    wanted = set(problem_ids)
                    chunk = [s for s in samples if s["problem_id"] in wanted]
                    if critic is None:  # built only when something is left to judge (a judge may load a model)
                        critic = spec.build(CriticContext(task=ctx.task, engine=ctx.engine, stage_weights=ctx.weights))
                    inputs = [{**s, "verdicts": dict(earlier[s["sample_id"]])} for s in chunk]
                    verdicts, timed_out = judge_all(critic, inputs, c.calls)
                    timeouts += timed_out
                    chunk_rows = [{
                        "sample_id": s["sample_id"], "problem_id": s["problem_id"], "critic": spec.id,
                        "score": None if v.score is None else float(v.score),
                        "label": None if v.label is None else bool(v.label), "rationale": v.rationale, "error": v.error,
                    } for s, v in zip(chunk, verdicts)]
                    save_rows(chunk_rows, shard)
                rows.extend(chunk_rows)
                bar.update(len(chunk_rows))
        finally:
            bar.close()
            if critic is not None:
                critic.close()
        order = {s["sample_id"]: i for i, s in enumerate(samples)}
        return sorted(rows, key=lambda r: order[r["sample_id"]]), timeouts

    def _gold(self, s: dict) -> bool | None:
        """task.grade's verdict where the sample has a gold answer; None where it has none or grading failed."""
        if not s.get("answer"):
            return None
        try:
            return bool(call_with_timeout(self.config.calls.timeout, self.ctx.task.grade, s, s["completion"]).correct)
        except Exception as err:  # noqa: BLE001 - TimedOut included; such a sample just has no gold
            log.warning("gold grading failed on %s: %s", s["sample_id"], err)
            return None


def critic_metrics(critic_id: str, rows: list[dict], gold: list[bool | None], timeouts: int) -> dict:
    """Counts for one critic (`invalid` next to `positive`, so both reach the console line), plus its quality
    against gold where gold is known."""
    positive = sum(bool(r["label"]) for r in rows)
    out = {f"{critic_id}/positive": positive, f"{critic_id}/invalid": sum(r["error"] is not None for r in rows),
           f"{critic_id}/positive_rate": positive / len(rows) if rows else 0.0, f"{critic_id}/timeouts": timeouts,
           f"{critic_id}/unlabelled": sum(r["error"] is None and r["label"] is None for r in rows)}
    judged = [(r, g) for r, g in zip(rows, gold) if g is not None and r["error"] is None]
    if judged:
        quality = critic_quality([r["label"] for r, _ in judged], [r["score"] for r, _ in judged],
                                 [g for _, g in judged])
        out.update({f"{critic_id}/{k}": quality[k]
                    for k in ("precision", "recall", "auroc", "auroc_ci_low", "auroc_ci_high")})
        out[f"{critic_id}/quality_n"] = quality["n"]
    return out
