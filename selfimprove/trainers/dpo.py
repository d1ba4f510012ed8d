"""Direct Preference Optimization with TRL's DPOTrainer and a PEFT LoRA adapter.

Data: rows with `prompt` (chat messages), `chosen` and `rejected` (one assistant message each), or all three
plain text (a task's `text` prompt format; records.reply).

The reference model, by `reference`:
- `base`: the base model. When the policy is a fresh adapter, TRL disables the adapter to get it (no second
  copy in memory); when the policy continues an earlier adapter, a plain copy of the base is loaded.
- `policy`: the weights the round started from (the previous round's policy). When the policy continues that
  adapter, TRL keeps a frozen copy of the adapter as the reference ("ref" adapter; no second base model);
  when it starts a fresh adapter, the previous policy is merged into a separate reference model.
  SPIN's opponent is exactly this: iteration t trains against iteration t-1.
`loss_type` and `beta` pass through to TRL (`sigmoid` is the original logistic DPO loss, which SPIN uses too).

Precision: on a CPU the policy and any separate reference are float32 (`training_dtype`), unlike SFT and the RL
update, which train on the base in its folder's dtype (bf16 for the embedded model). A bf16 forward pass adds each
layer's LoRA output to bf16 activations and rounds the sum back to bf16, which drops most of a young adapter's
effect; DPO's loss is made of exactly that effect (the policy-reference log-ratio). After 6 steps bf16 read half
the reward margin float32 read for the same adapter (benchmarks/README.md P15): the adapters still agreed (at
small margins the loss weighs all pairs alike), but the loss and margins the stage reports, and the weighting of
pairs once margins grow, were wrong by that much. float32 costs 1.29x per step there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..registry import TRAINERS
from .common import LoraSettings, Optimization, common_args, fit, load_policy, make_trainer


@TRAINERS.register("dpo")
class DPO:
    @dataclass
    class Config:
        lora: LoraSettings = field(default_factory=LoraSettings)
        optim: Optimization = field(default_factory=lambda: Optimization(learning_rate=5e-5))
        beta: float = 0.1
        loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
        loss_weights: list[float] | None = None  # with several loss types, e.g. [sigmoid, sft] (RPO)
        reference: Literal["base", "policy"] = "base"

        def __post_init__(self):
            if self.beta <= 0:
                raise ValueError("beta must be > 0")
            if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
                raise ValueError("loss_weights needs one weight per loss_type")

    def __init__(self, config: "DPO.Config"):
        self.config = config

    def train(self, rows: list[dict], base_path: str, init_adapter: str | None, adapter_out: Path, work_dir: Path,
              seed: int, round_index: int, policy_adapter: str | None = None) -> dict:
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        c = self.config
        started = time.time()
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        model, peft_config = load_policy(base_path, init_adapter, c.lora, dtype=training_dtype())
        ref_model, reference = self._reference(base_path, init_adapter, policy_adapter)
        dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        args = DPOConfig(**common_args(c.optim, work_dir, seed, round_index), beta=c.beta,
                         loss_type=list(c.loss_type), loss_weights=c.loss_weights)
        trainer = make_trainer(DPOTrainer, model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                               processing_class=tokenizer, peft_config=peft_config)
        identity = {"trainer": "dpo", "config": asdict(c), "rows": rows, "base": base_path, "init": init_adapter,
                    "policy": policy_adapter, "seed": seed, "round": round_index}
        metrics = fit(trainer, identity, adapter_out, started)
        margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
        return {"pairs": len(rows), "reference": reference, **metrics,
                "final_reward_margin": margins[-1] if margins else None}

    def _reference(self, base_path: str, init_adapter: str | None, policy_adapter: str | None):
        """(ref_model to hand TRL or None, a description of the reference)."""
        if self.config.reference == "base" or policy_adapter is None:
            # policy_adapter None: round 1, or a policy that is the base model: the previous policy *is* the base.
            name = "base" if self.config.reference == "base" else "policy = base"
            if init_adapter is None:
                return None, f"{name} (adapter disabled)"
            return _plain_model(base_path, None), f"{name} (separate copy)"
        if init_adapter == policy_adapter:
            return None, f"policy {policy_adapter} (frozen adapter copy)"
        return _plain_model(base_path, policy_adapter), f"policy {policy_adapter} (merged copy)"


def training_dtype():
    """The policy's and the reference's dtype: float32 on a CPU (the module docstring says why); on a GPU the
    folder's, under TRL's bf16 autocast (not measured here)."""
    import torch

    return "auto" if torch.cuda.is_available() else torch.float32


def _plain_model(base_path: str, adapter: str | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # the policy's dtype: a reference in another precision would add their rounding difference to every margin
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=training_dtype())
    return model if adapter is None else PeftModel.from_pretrained(model, adapter).merge_and_unload()
