"""Gold data: an SFT training set of the task's own worked solutions, with no model in the loop.

Each selected problem becomes one training row (records.py's training schema, as `filter` writes it) whose
completion is `task.reference_solution(problem)`: the arithmetic task's column-by-column scratchpads, GSM8K's
worked answers. A `train` stage on it is the supervised fine-tuning that several methods start from: SPIN
(Chen et al., 2024) runs on a model already fine-tuned on its SFT data, and a process reward model needs a
policy whose steps follow the format its step oracle checks. `sft_gold_arithmetic.yaml` is that run; a later
pipeline starts from its adapter with `adapter:` (docs/results.md's SPIN and PRM sections show the commands).

Problems without a reference solution are counted (`without_gold`) and skipped; a task that has none at all is
refused at run time, since nothing could be trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..artifacts import save_rows
from ..records import reply
from ..registry import STAGES
from .base import Stage
from .common import ProblemSelection


@STAGES.register("gold_data")
class GoldData(Stage):
    @dataclass
    class Config:
        problems: ProblemSelection = field(default_factory=ProblemSelection)

    @classmethod
    def needs_gold(cls, config) -> str | None:
        return "drop the stage (set it to null), which trains on the task's worked solutions"

    def run(self) -> dict:
        ctx = self.ctx
        problems = self.config.problems.select(ctx.task.problems(self.config.problems.split), ctx.seed("problems"))
        rows, without = [], 0
        for problem in problems:
            gold = ctx.task.reference_solution(problem)
            if gold is None:
                without += 1
                continue
            prompt = ctx.task.prompt(problem)
            rows.append({"prompt": prompt, "completion": reply(prompt, gold),
                         "problem_id": problem["problem_id"], "sample_ids": [], "source": "gold",
                         "rationalized": False})
        if problems and not rows:
            raise ValueError(f"stage {ctx.stage}: task {type(ctx.task).__name__} has no reference solutions for "
                             f"its {self.config.problems.split!r} problems, so there is no gold data to train on")
        save_rows(rows, ctx.out_dir / "data")
        return {"examples": len(rows), "without_gold": without}

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        return {"gold examples": str(metrics["examples"])}
