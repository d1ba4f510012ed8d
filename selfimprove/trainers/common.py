"""What every TRL-based trainer here shares: LoRA and optimisation settings, the policy model (a fresh adapter on
the base, or an existing one continued), checkpoints and resuming, the loss guard, and saving a standard PEFT
adapter folder.

Crash safety: every `checkpoint_every` optimizer steps, transformers' Trainer writes `checkpoint-<step>/` into the
trainer's work folder (adapter, optimizer, scheduler, RNG states, trainer state; the data position is the step
count: on resume the Trainer re-seeds the epoch's sampler and skips the batches already seen). A checkpoint is
trusted only once `checkpoint_complete.json` is in it, written after all its files are on disk; the next call of
the same training on the same work folder resumes from the newest trusted one, and ends with the same adapter as
a run that was never interrupted (bit for bit in tests/test_train_resume.py, on CPU and on a GPU in bf16).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import trackers
from ..artifacts import replace_dir, write_json
from ..console import quiet_training_logs
from ..records import canonical


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
    # Optimizer steps between checkpoints (0: none). A kill loses at most this many steps; a LoRA checkpoint
    # (adapter + Adam moments) takes well under a second to write.
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.checkpoint_every < 0:
            raise ValueError("checkpoint_every must be >= 0 (0: no checkpoints)")

    def steps_for_round(self, round_index: int) -> int:
        if self.max_steps <= 0:
            return -1
        return max(1, math.ceil(self.max_steps * self.steps_growth ** max(0, round_index - 1)))


def device_kwargs() -> dict:
    """TRL/transformers arguments for the device at hand (TRL's defaults assume a GPU: bf16, checkpointing)."""
    import torch

    gpu = torch.cuda.is_available()
    return {"use_cpu": not gpu, "bf16": gpu and torch.cuda.is_bf16_supported(), "gradient_checkpointing": False}


def common_args(opt: Optimization, out_dir: Path, seed: int, round_index: int) -> dict:
    """The arguments every TRL config here (SFTConfig, DPOConfig) takes from `opt`."""
    return dict(
        output_dir=str(out_dir), learning_rate=opt.learning_rate, num_train_epochs=opt.epochs,
        max_steps=opt.steps_for_round(round_index), per_device_train_batch_size=opt.batch_size,
        gradient_accumulation_steps=opt.grad_accum, max_length=opt.max_length, warmup_steps=opt.warmup,
        lr_scheduler_type=opt.lr_scheduler, weight_decay=opt.weight_decay, logging_steps=opt.logging_steps,
        logging_first_step=True,  # so a run shorter than logging_steps still reports its starting loss
        # Full checkpoints (not only the model), so that a resumed run continues the same optimisation. Two are
        # kept: when the newer one is cut short by a kill, the older one is still complete.
        save_strategy="steps" if opt.checkpoint_every else "no", save_steps=max(opt.checkpoint_every, 1),
        save_only_model=False, save_total_limit=2,
        report_to=[], seed=seed, data_seed=seed, disable_tqdm=False,
        **device_kwargs(),
    )


COMPLETE = "checkpoint_complete.json"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the adapter was not saved."""


def make_trainer(trainer_cls, **kwargs):
    """`trainer_cls(**kwargs)` (a TRL trainer) that marks its checkpoints complete and stops on a non-finite loss."""
    import torch
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        # transformers writes a checkpoint file by file, trainer_state.json last, none of them atomically; the
        # marker, written after everything is flushed to disk, is the one sign that the folder can be trusted.
        def on_save(self, args, state, control, **_):
            from accelerate import PartialState

            PartialState().wait_for_everyone()  # every process's part (its RNG state) is written before the marker
            if args.should_save:
                _mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

    class Guarded(trainer_cls):
        # The check sits on the loss of every micro-batch, before its backward pass, so a NaN never reaches the
        # weights or a checkpoint. A callback on the logs would come too late: logs come every logging_steps,
        # and the Trainer's logging_nan_inf_filter replaces a NaN loss by the mean of the earlier ones.
        # (The .item() it costs adds no GPU sync: TRL already reads per-step metrics back every micro-batch.)
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            if model.training and not torch.isfinite(loss.detach()).all():
                lr = self.args.learning_rate
                raise TrainingDiverged(
                    f"training diverged: the loss is {loss.detach().float().mean().item()} at optimizer step "
                    f"{self.state.global_step + 1} of {self.state.max_steps}; the adapter was not saved. Try a "
                    f"lower learning_rate (now {lr:g}; e.g. {lr / 10:g}) or some warmup; a model in bf16 can "
                    f"also overflow where float32 would not. A changed config trains afresh.")
            return out

    tracked = trackers.training_callback()  # the pipeline's tracker run, when `report_to` names one
    trainer = Guarded(callbacks=[MarkComplete(), *([tracked] if tracked else [])], **kwargs)
    quiet_training_logs(trainer)
    return trainer


def fit(trainer, identity: dict, adapter_out: Path, started: float) -> dict:
    """Run `trainer`, resuming from the newest complete checkpoint of this same training (`identity`: everything
    the result depends on) in its output folder, and save the trained adapter to `adapter_out`. Returns the losses
    over the whole training (a resumed one's log history comes with its checkpoint), and the time since `started`
    and speed of this call, which ran the steps after the one it resumed from."""
    from accelerate import PartialState
    from transformers import TrainerState

    # Under a launcher every process looks for the checkpoint; only the main one cleans up and records the key,
    # first, so that no process reads the key file while another rewrites it.
    process = PartialState()
    with process.main_process_first():
        checkpoint = resume_point(Path(trainer.args.output_dir), identity, tidy=process.is_main_process)
    resumed_from = 0
    if checkpoint is None:
        trainer.train()
    else:
        state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        load_trained_adapter(trainer.model, checkpoint)
        resumed_from = state.global_step
        if state.global_step >= state.max_steps:
            # Killed after the last step, before the adapter was saved. Resuming would train one step too many
            # when the last step is mid-epoch (the Trainer steps once before it checks max_steps).
            trainer.state = state
        else:
            trainer.train(resume_from_checkpoint=str(checkpoint))
    save_adapter(trainer.model, adapter_out)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    steps = max((h.get("step", 0) for h in history), default=0)
    seconds, run = time.time() - started, steps - resumed_from
    return {"steps": steps, "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "resumed_from_step": resumed_from, "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / run, 2) if run > 0 else None}


def resume_point(work_dir: Path, identity: dict, tidy: bool = True, key_name: str = "training_key") -> Path | None:
    """The newest complete checkpoint in `work_dir` of the training `identity` describes, or None. With `tidy`,
    removes the checkpoints that cannot be resumed: incomplete ones, and all of them when they belong to another
    training (another config, data, start or seed: the optimizer state would carry the old learning rate), and
    records `identity`'s key in the file `key_name` (the launcher keys its launches in a file of its own)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    key_file = work_dir / key_name
    same = key_file.exists() and key_file.read_text() == key
    found = sorted((int(m.group(1)), p) for p in work_dir.iterdir()
                   if p.is_dir() and (m := CHECKPOINT.fullmatch(p.name)))
    complete = []
    for step, folder in found:
        if same and is_complete(folder, step):
            complete.append(folder)
        elif tidy:
            shutil.rmtree(folder)
    if tidy:
        key_file.write_text(key)
    return complete[-1] if complete else None


def load_trained_adapter(model, checkpoint: Path) -> None:
    """Load the trained (active) adapter's weights from `checkpoint` into `model`.

    The Trainer does this itself only when the checkpoint holds one adapter: with a second one in a subfolder
    (DPO's frozen "ref" copy of the starting adapter) it loads the subfolders only, and the trained adapter would
    silently restart from its initial weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    result = set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"),
                                       adapter_name=model.active_adapter)
    if result.unexpected_keys:
        raise RuntimeError(f"{checkpoint}: adapter weights that the model lacks: {result.unexpected_keys[:3]}")


def _mark_complete(folder: Path, step: int) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync(path)
    write_json(folder / COMPLETE, {"step": step})  # flushed to disk, then renamed into place
    _fsync(folder)
    _fsync(folder.parent)  # the checkpoint folder's own entry


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(folder: Path, step: int) -> bool:
    try:
        return json.loads((folder / COMPLETE).read_text())["step"] == step
    except (OSError, ValueError, KeyError, TypeError):
        return False


def load_policy(base_path: str, init_adapter: str | None, lora: LoraSettings, dtype="auto"):
    """The model to train and the peft_config to hand TRL (None when the model already carries the adapter);
    `dtype`: the frozen base's, "auto" for the folder's."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    # By default the frozen base stays in the folder's dtype (bf16 for the embedded model: on a CPU 1.30x faster
    # per SFT step and 1.50x per RL update than float32, with a quarter less memory: benchmarks/README.md P15);
    # PEFT keeps the trainable adapter weights in fp32 (autocast_adapter_dtype).
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
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
        # Only the trained adapter: DPO against its starting policy also holds a frozen copy of it ("ref").
        model.save_pretrained(tmp, selected_adapters=[model.active_adapter])
        # The same weights must give the same files (manifest checksums, resume comparisons): PEFT writes
        # target_modules in set order, which changes from process to process.
        config = tmp / "adapter_config.json"
        config.write_text(json.dumps(canonical(json.loads(config.read_text())), indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
