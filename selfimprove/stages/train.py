"""Train: fit a LoRA adapter on a training set with a registered trainer (TRL SFT, DPO, or a user's own).

Writes `adapter/` (a standard PEFT folder) and `weights.json` (base identity, adapter hash, lineage).
`init: base` starts a fresh adapter from the base model every round (STaR); `init: policy` continues the
adapter the round started from. With no examples (nothing passed the filter) there is nothing to learn:
`on_empty: stop` (the default) stops the run with a message naming the data stage and what it reported;
`on_empty: skip` records that nothing was trained and hands on the weights it would have started from.

`role: judge` trains a judge's adapter (on a judge_data stage's rows, stages/judge.py): the run's policy never
comes from it (`policy` and `latest` pass it by); a judge_data stage or a critic names it with `weights:`.

`launch: {num_processes: 2, ...}` trains under several processes with the same global batch (docs/launch.md),
their output in the stage's `train.log`; with `num_processes: 1` (the default) the trainer runs in this process.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import load_rows, read_json, write_json
from ..models import model_identity
from ..records import adapter_hash
from ..registry import STAGES, TrainerSpec
from ..trainers import launch as launcher
from .base import Stage


class NothingToTrain(RuntimeError):
    """The training set is empty."""


@STAGES.register("train")
class Train(Stage):
    produces_weights = True
    trains_offline = True
    outputs = ("adapter", "weights.json")

    @dataclass
    class Config:
        data: str = "filter"  # the stage whose dataset is trained on
        trainer: TrainerSpec = field(default_factory=lambda: TrainerSpec.named("sft"))
        init: Literal["base", "policy"] = "base"
        on_empty: Literal["stop", "skip"] = "stop"  # what an empty training set does
        role: Literal["policy", "judge"] = "policy"  # judge: the adapter is a judge's, never the policy
        launch: launcher.Launch = field(default_factory=launcher.Launch)  # processes to train with

        def __post_init__(self):
            if getattr(self.trainer.target, "online", False):
                raise ValueError(f"trainer {self.trainer.name!r} is an online RL trainer; use it in a stage of "
                                 f"type `rl`, which samples from the policy as it trains")
            launcher.check_batch(self.trainer, self.launch)

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.data]

    def run(self) -> dict:
        ctx, c = self.ctx, self.config
        rows = load_rows(ctx.input_dir(c.data) / "data")
        policy = ctx.weights("policy")
        start = policy if c.init == "policy" else ctx.weights("base")
        if not rows:
            if c.on_empty == "stop":
                reported = read_json(ctx.input_dir(c.data) / "manifest.json")["metrics"]
                raise NothingToTrain(
                    f"stage {ctx.stage} (round {ctx.round}): stage {c.data!r} produced no training rows "
                    f"(it reported {reported}). Check what selects the rows (its critic's verdicts, labels and "
                    f"errors in the critique stage's metrics), or set stages.{ctx.stage}.on_empty=skip to go on "
                    f"without training this round.")
            write_json(ctx.out_dir / "weights.json", {**start.to_dict(), "trained": False})
            return {"examples": 0, "trained": False}
        adapter_dir = ctx.out_dir / "adapter"
        work = ctx.out_dir / "trainer"  # the trainer's checkpoints: kept until the adapter is written
        metrics = launcher.run(c.launch, c.trainer, rows, ctx.base_model, start.adapter, adapter_dir, work,
                               seed=ctx.seed("train"), round_index=ctx.round, policy_adapter=policy.adapter,
                               log_file=ctx.out_dir / "train.log", label=f"stage {ctx.stage} (round {ctx.round})")
        shutil.rmtree(work, ignore_errors=True)
        write_json(ctx.out_dir / "weights.json", {
            "base": ctx.base_model, "base_identity": model_identity(ctx.base_model), "adapter": str(adapter_dir),
            "adapter_hash": adapter_hash(adapter_dir), "label": f"round_{ctx.round:03d}/{ctx.stage}",
            "init": start.to_dict(), "policy": policy.to_dict(), "trained": True,
        })
        return {**metrics, "trained": True}

    @classmethod
    def report(cls, metrics: dict) -> dict[str, str]:
        if not metrics.get("trained"):
            return {"trained on": "nothing"}
        cells = {"trained on": f"{metrics['pairs']} pairs" if "pairs" in metrics else f"{metrics.get('examples', 0)} examples"}
        if metrics.get("final_loss") is not None:
            cells["train loss"] = f"{metrics['first_loss']:.3f}→{metrics['final_loss']:.3f}"
        return cells
