"""Generate: k samples per problem from the current policy (resumable: see rollout.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..artifacts import load_rows, save_rows
from ..records import SamplingConfig
from ..registry import STAGES
from .base import Stage
from .common import problem_subset, unsolved_problem_ids
from .rollout import sample_problems


@dataclass
class ProblemSelection:
    split: str = "train"
    num_problems: int | None = None  # None = the whole split
    # Draw a fresh random subset each round (seeded by run seed and round); false = the first num_problems.
    shuffle: bool = True


@STAGES.register("generate")
class Generate(Stage):
    @dataclass
    class Config:
        problems: ProblemSelection = field(default_factory=ProblemSelection)
        sampling: SamplingConfig = field(default_factory=SamplingConfig)
        weights: str = "policy"
        # STaR rationalization: show the gold answer in the prompt (samples keep `hint: true`).
        hint: bool = False
        # Only the problems of `problems.split` that have no sample labelled correct in this critique stage
        # (of this round), e.g. STaR's rationalization of the problems it failed.
        unsolved_in: str | None = None
        chunk_size: int = 256  # problems per engine call and per resume point (small chunks starve the batch)

        def __post_init__(self):
            if self.chunk_size < 1:
                raise ValueError("chunk_size must be >= 1")

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.unsolved_in] if config.unsolved_in else []

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        problems = self._problems()
        rows = sample_problems(
            engine=ctx.engine, task=ctx.task, problems=problems, sampling=c.sampling, weights=ctx.weights(c.weights),
            hint=c.hint, chunk_size=c.chunk_size, shard_dir=ctx.out_dir / "shards",
            chunk_seed=lambda i: ctx.seed("chunk", i), round_index=ctx.round, stage=ctx.stage,
        )
        save_rows(rows, ctx.out_dir / "data")
        return {"problems": len(problems), "samples": len(rows), "tokens": sum(r["num_tokens"] for r in rows)}

    def _problems(self) -> list[dict]:
        c, ctx = self.config, self.ctx
        problems = ctx.task.problems(c.problems.split)
        if c.unsolved_in:
            unsolved = unsolved_problem_ids(load_rows(ctx.input_dir(c.unsolved_in) / "data"))
            return [p for p in problems if p["problem_id"] in unsolved]
        rng = random.Random(ctx.seed("problems")) if c.problems.shuffle else None
        return problem_subset(problems, c.problems.num_problems, rng)
