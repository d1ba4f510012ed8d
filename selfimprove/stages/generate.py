"""Generate: k samples per problem from the current policy (chunked and resumable: see rollout.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..artifacts import load_rows, save_rows
from ..records import SamplingConfig
from ..registry import STAGES
from .base import Stage
from .common import Chunking, ProblemSelection, check_critic_choice, unsolved_problem_ids
from .rollout import sample_problems


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
        # (of this round), e.g. STaR's rationalization of the problems it failed; `critic` names the critic
        # whose label decides when that stage runs several.
        unsolved_in: str | None = None
        critic: str | None = None
        chunking: Chunking = field(default_factory=Chunking)

        def __post_init__(self):
            if self.critic is not None and self.unsolved_in is None:
                raise ValueError("critic: only decides which problems count as solved in `unsolved_in`; set both")

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.unsolved_in] if config.unsolved_in else []

    @classmethod
    def check(cls, config, earlier: dict) -> None:
        if config.unsolved_in:
            check_critic_choice(config.critic, config.unsolved_in, earlier)

    def run(self) -> dict:
        c, ctx = self.config, self.ctx
        problems = self._problems()
        rows = sample_problems(
            engine=ctx.engine, task=ctx.task, problems=problems, sampling=c.sampling, weights=ctx.weights(c.weights),
            hint=c.hint, chunking=c.chunking, shard_dir=ctx.out_dir / "shards", seed=ctx.seed,
            round_index=ctx.round, stage=ctx.stage,
        )
        save_rows(rows, ctx.out_dir / "data")
        return {"problems": len(problems), "samples": len(rows), "tokens": sum(r["num_tokens"] for r in rows)}

    def _problems(self) -> list[dict]:
        c, ctx = self.config, self.ctx
        problems = ctx.task.problems(c.problems.split)
        if c.unsolved_in:
            verdicts = load_rows(ctx.input_dir(c.unsolved_in) / "data")
            unsolved = unsolved_problem_ids(verdicts, c.critic, c.unsolved_in)
            return [p for p in problems if p["problem_id"] in unsolved]
        return c.problems.select(problems, ctx.seed("problems"))
