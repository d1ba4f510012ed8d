"""Train: fit a LoRA adapter on a training set with a registered trainer (TRL SFT, ...).

Writes `adapter/` (a standard PEFT folder) and `weights.json` (base identity, adapter hash, lineage).
`init: base` starts a fresh adapter from the base model every round (STaR); `init: policy` continues the
adapter the round started from. With no examples (nothing passed the filter) there is nothing to learn: the
stage records that and hands on the weights it would have started from.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Literal

from ..artifacts import load_rows, write_json
from ..config import ConfigError
from ..records import adapter_hash
from ..models import model_identity
from ..registry import STAGES
from ..trainers import resolve_trainer
from .base import Stage


@STAGES.register("train")
class Train(Stage):
    produces_weights = True

    @dataclass
    class Config:
        data: str = "filter"  # the stage whose dataset is trained on
        trainer: dict = field(default_factory=lambda: {"name": "sft"})
        init: Literal["base", "policy"] = "base"

        def __post_init__(self):
            if "name" not in self.trainer:
                raise ValueError("trainer needs a name, e.g. {name: sft}")

    @classmethod
    def references(cls, config) -> list[str]:
        return [config.data]

    @classmethod
    def check(cls, config, where: str, key: str) -> None:
        trainer_cls, _ = resolve_trainer(config.trainer, where, f"{key}.trainer")
        if getattr(trainer_cls, "online", False):
            raise ConfigError(f"{where}: {key}.trainer.name: {config.trainer['name']!r} is an online RL trainer; "
                              f"use it in a stage of "
                              f"type `rl`, which samples from the policy as it trains")

    def run(self) -> dict:
        ctx, c = self.ctx, self.config
        trainer_cls, trainer_config = resolve_trainer(c.trainer, "pipeline", f"stages.{ctx.stage}.trainer")
        rows = load_rows(ctx.input_dir(c.data) / "data")
        policy = ctx.weights("policy")
        start = policy if c.init == "policy" else ctx.weights("base")
        adapter_dir = ctx.out_dir / "adapter"
        if not rows:
            record = {"base": start.base, "adapter": start.adapter, "label": start.label, "trained": False}
            write_json(ctx.out_dir / "weights.json", record)
            return {"examples": 0, "trained": False}
        work = ctx.out_dir / "trainer"
        metrics = trainer_cls(trainer_config).train(rows, ctx.base_model, start.adapter, adapter_dir, work,
                                                    seed=ctx.seed("train"), round_index=ctx.round,
                                                    policy_adapter=policy.adapter)
        shutil.rmtree(work, ignore_errors=True)  # TRL's scratch folder; the adapter is what we keep
        write_json(ctx.out_dir / "weights.json", {
            "base": ctx.base_model, "base_identity": model_identity(ctx.base_model), "adapter": str(adapter_dir),
            "adapter_hash": adapter_hash(adapter_dir), "label": f"round_{ctx.round:03d}/{ctx.stage}",
            "init": start.to_dict(), "policy": policy.to_dict(), "trained": True,
        })
        return {**metrics, "trained": True}

