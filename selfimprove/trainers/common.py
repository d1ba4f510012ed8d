"""What every TRL-based trainer here shares: LoRA and optimisation settings, the policy model, and saving.

Training always produces a standard PEFT adapter folder on the run's base model. A trainer starts either from
the base model (a fresh adapter: STaR restarts every iteration) or from an existing adapter (continued
training), as the train stage decides.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import replace_dir


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class Optimization:
    learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    # STaR grows the number of training steps by 20% per outer iteration: steps of round r = max_steps * growth^(r-1).
    steps_growth: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    warmup: float = 0.0  # < 1: fraction of the steps; >= 1: number of steps (transformers warmup_steps)
    lr_scheduler: str = "constant"
    weight_decay: float = 0.0
    logging_steps: int = 5

    def steps_for_round(self, round_index: int) -> int:
        if self.max_steps <= 0:
            return -1
        return max(1, math.ceil(self.max_steps * self.steps_growth ** max(0, round_index - 1)))


def device_kwargs() -> dict:
    """TRL/transformers arguments for the device at hand (TRL's defaults assume a GPU: bf16, checkpointing)."""
    import torch

    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "gradient_checkpointing": False}
    return {"use_cpu": True, "bf16": False, "gradient_checkpointing": False}


def common_args(opt: Optimization, out_dir: Path, seed: int, round_index: int) -> dict:
    return dict(
        output_dir=str(out_dir), learning_rate=opt.learning_rate, num_train_epochs=opt.epochs,
        max_steps=opt.steps_for_round(round_index), per_device_train_batch_size=opt.batch_size,
        gradient_accumulation_steps=opt.grad_accum, warmup_steps=opt.warmup,
        lr_scheduler_type=opt.lr_scheduler, weight_decay=opt.weight_decay, logging_steps=opt.logging_steps,
        logging_first_step=True,  # so a run shorter than logging_steps still reports its starting loss
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, disable_tqdm=False,
        **device_kwargs(),
    )


def load_policy(base_path: str, init_adapter: str | None, lora: LoraSettings):
    """The model to train and the peft_config to hand TRL (None when the model already carries the adapter)."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    # The frozen base stays in the folder's dtype (bf16 for the embedded model: ~1.4x faster per step on this
    # CPU than fp32); PEFT keeps the trainable adapter weights in fp32 (autocast_adapter_dtype).
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    if init_adapter:
        return PeftModel.from_pretrained(model, init_adapter, is_trainable=True), None
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return model, config


def save_adapter(model, out: Path) -> None:
    """Write the trained adapter to `out` atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarize(log_history: list[dict], started: float) -> dict:
    losses = [h["loss"] for h in log_history if "loss" in h]
    steps = max((h.get("step", 0) for h in log_history), default=0)
    seconds = time.time() - started
    return {"steps": steps, "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "train_seconds": round(seconds, 1), "seconds_per_step": round(seconds / steps, 2) if steps else None}
