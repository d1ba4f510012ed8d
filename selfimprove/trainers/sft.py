"""Supervised fine-tuning with TRL's SFTTrainer and a PEFT LoRA adapter.

Data: prompt-completion rows in chat form (`prompt`: messages, `completion`: one assistant message) or as plain
text (a task's `text` prompt format; TRL then appends the EOS token to the completion); the loss covers the
completion tokens only (`completion_only_loss=True`), never the prompt or few-shot exemplars.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..registry import TRAINERS
from .common import LoraSettings, Optimization, common_args, fit, load_policy, make_trainer


@TRAINERS.register("sft")
class SFT:
    @dataclass
    class Config:
        lora: LoraSettings = field(default_factory=LoraSettings)
        optim: Optimization = field(default_factory=Optimization)

    def __init__(self, config: "SFT.Config"):
        self.config = config

    def train(self, rows: list[dict], base_path: str, init_adapter: str | None, adapter_out: Path, work_dir: Path,
              seed: int, round_index: int, policy_adapter: str | None = None) -> dict:
        """Fit an adapter on `rows`; `policy_adapter` (the round's starting policy) is unused: SFT has no reference."""
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        started = time.time()
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        model, peft_config = load_policy(base_path, init_adapter, self.config.lora)
        dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        args = SFTConfig(**common_args(self.config.optim, work_dir, seed, round_index), completion_only_loss=True)
        trainer = make_trainer(SFTTrainer, model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                               peft_config=peft_config)
        identity = {"trainer": "sft", "config": asdict(self.config), "rows": rows, "base": base_path,
                    "init": init_adapter, "seed": seed, "round": round_index}
        return {"examples": len(rows), **fit(trainer, identity, adapter_out, started)}
