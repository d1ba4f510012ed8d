"""Step labels: Monte-Carlo labels for every step of a generate stage's samples (Math-Shepherd; the method, its
deviations from the paper and the row schema are in selfimprove/step_labels.py).

Writes one row per sample (`sample_id`, `problem_id`, `prompt`, `completion`, `steps`, `outcomes`, `soft`,
`hard`, `oracle`): the training data of a process reward model. Where the task checks steps exactly
(arithmetic), the metrics carry the labels' agreement with that oracle by number of rollouts
(`agreement/hard@K`, `agreement/soft@K`).

Resumable like critique: each chunk of problems is saved under `shards/` before the next is rolled out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..artifacts import load_rows, save_rows
from ..records import SamplingConfig
from ..registry import STAGES
from ..step_labels import chat_continuation, chat_tokenizer, mc_step_labels, oracle_agreement
from .base import Stage
from .common import Chunking


@STAGES.register("step_labels")
class StepLabels(Stage):
    @dataclass
    class Config:
        samples: str = "generate"  # the generate stage whose samples are labelled
        rollouts: int = 4  # K: continuations per step prefix
        sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7))
        weights: str = "policy"  # the policy that rolls out (Math-Shepherd: the generator itself)
        max_samples: int | None = None  # the first this many samples (None: all)
        chunking: Chunking = field(default_factory=Chunking)

        def __post_init__(self):
            if self.rollouts < 1:
                raise ValueError("rollouts must be >= 1")
            if self.sampling.temperature == 0 and self.rollouts > 1:
                raise ValueError(f"rollouts={self.rollouts} at temperature 0 would be copies of one greedy rollout")
            if self.max_samples is not None and self.max_samples < 1:
                raise ValueError("max_samples must be >= 1 (or null for all)")

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.samples]

    @classmethod
    def needs_gold(cls, config) -> str | None:
        return "drop the stage (set it to null), whose rollouts are graded against the gold answer"

    def run(self) -> dict:
        ctx, c = self.ctx, self.config
        samples = load_rows(ctx.input_dir(c.samples) / "data")[: c.max_samples]
        weights = ctx.weights(c.weights)
        engine, continuation, rows = None, None, []
        for k, problem_ids in enumerate(c.chunking.split(list(dict.fromkeys(s["problem_id"] for s in samples)))):
            shard = ctx.out_dir / "shards" / f"{k:05d}"
            if shard.exists():  # finished before an interruption
                rows.extend(load_rows(shard))
                continue
            if engine is None:
                engine = ctx.engine()
                continuation = chat_continuation(chat_tokenizer(engine, weights.base))
            wanted = set(problem_ids)
            chunk = mc_step_labels(engine, ctx.task, [s for s in samples if s["problem_id"] in wanted], c.rollouts,
                                   c.sampling, weights, ctx.seed("rollouts", k), continuation)
            save_rows(chunk, shard)
            rows.extend(chunk)
        save_rows(rows, ctx.out_dir / "data")
        steps = sum(len(r["steps"]) for r in rows)
        return {"samples": len(rows), "steps": steps, "rollouts": sum(len(o) for r in rows for o in r["outcomes"]),
                "hard_positive_rate": sum(h for r in rows for h in r["hard"]) / steps if steps else 0.0,
                **oracle_agreement(rows)}

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        k = max((int(key.split("@")[1]) for key in metrics if key.startswith("agreement/hard@")), default=None)
        return {} if k is None else {f"MC label agreement (K={k})": f"{metrics[f'agreement/hard@{k}']:.3f}"}
