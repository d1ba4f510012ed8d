"""The stage interface. A stage reads artifacts of earlier stages, writes its own, and nothing else.

A stage class has a `Config` dataclass (its YAML parameters; component fields such as a trainer or critics arrive
resolved, see registry.py) and one entry method, `run()`, returning a flat dict of metrics/counts for the manifest
and `metrics.jsonl`. It finds its inputs and writes its output through a `StageContext` from the pipeline runner,
the only code that knows about rounds, resume and the run directory layout.

`outputs` are the files and folders a stage writes into `ctx.out_dir` (`data/`: its dataset; `adapter/` +
`weights.json`, which later stages can name, when it `produces_weights`), listed with checksums in its manifest
and verified before a finished stage is reused. What it keeps for resuming (generation shards) is written
atomically and is not an output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from ..records import Weights


class StageContext(Protocol):
    round: int
    stage: str
    out_dir: Path
    task: Any
    base_model: str

    def seed(self, *parts: Any) -> int:
        """A seed derived from (run seed, round, stage, *parts)."""

    def engine(self) -> Any:
        """The run's generation engine (built once per run, on first use)."""

    def weights(self, which: str) -> Weights:
        """`policy`: the weights this round starts from (previous round's trained weights, or the base);
        `latest`: the newest weights in the run so far (this round's, if a stage produced some already);
        `base`: the base model; or the name of a weights-producing stage: its weights of this round when it runs
        earlier in the round, else its newest from earlier rounds, else the base model."""

    def input_dir(self, stage: str) -> Path:
        """The folder of a finished stage of this round."""


class Stage:
    produces_weights = False
    evaluates = False  # it only measures weights: round 0 (the base model's evaluation) runs exactly these stages
    # It trains without sampling: the runner may stop an engine that allows it (`release_for_training`) for the
    # stage, to free the engine's memory, and the next stage that generates starts a fresh one.
    trains_offline = False
    outputs: tuple[str, ...] = ("data",)
    Config: type

    def __init__(self, config, ctx: StageContext):
        self.config = config
        self.ctx = ctx

    def run(self) -> dict:
        raise NotImplementedError

    @classmethod
    def references(cls, config) -> list[str]:
        """Names of the stages (of the same round) whose outputs this stage reads; checked at config load."""
        return []

    @classmethod
    def check(cls, config, earlier: dict) -> None:
        """Checks against the round's earlier stages (`earlier`: name → registry.StageSpec) at config load."""

    @classmethod
    def needs_gold(cls, config) -> str | None:
        """None when the stage reads no gold answers or solutions; else how to do without them. On label-free data
        the stage is refused at config load, and the error offers this after "give the task its answer column, or"."""
        return "drop the stage (set it to null), which grades against gold" if cls.evaluates else None

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        """Cells this stage adds to its round's row of the run report, from its metrics."""
        return {}


def gold_critics(critics) -> str | None:
    """The ids of the critics among `critics` (CriticSpecs) that grade against gold answers, quoted, or None: a
    stage built on them reads gold (`needs_gold`). A critic class says so with `reads_gold = True`."""
    ids = [repr(critic.id) for critic in critics if getattr(critic.target, "reads_gold", False)]
    return ", ".join(ids) or None
