"""Checkpoints and resuming on the tiny model: a training killed mid-way, run again on the same work folder, ends
with the adapter an uninterrupted run gives, bit for bit (float32, and transformers restores the optimizer,
scheduler, RNG states and data position); checkpoints that cannot be trusted are not resumed; a diverging loss
stops training.

The runs: 6 examples in batches of 2 (3 steps an epoch), 5 steps, a checkpoint every 2 (and one at the end), LoRA
dropout on so that a wrongly restored RNG state would show.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfimprove.trainers.common import (COMPLETE, LoraSettings, Optimization, TrainingDiverged, _mark_complete,
                                         resume_point)
from selfimprove.trainers.dpo import DPO
from selfimprove.trainers.sft import SFT
from tests.kill_in_step import hang_in_step, kill_in_step


ROWS = [{"prompt": [{"role": "user", "content": f"{a} + {a + 1} = ?"}],
         "completion": [{"role": "assistant", "content": f"It is {2 * a + 1}."}]} for a in range(6)]
PAIRS = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": [{"role": "assistant", "content": "No idea."}]}
         for r in ROWS]
LORA = LoraSettings(r=4, alpha=8, dropout=0.1)


def optim(**changes) -> Optimization:
    return Optimization(**{"learning_rate": 1e-3, "max_steps": 5, "batch_size": 2, "logging_steps": 1,
                           "checkpoint_every": 2, **changes})


def sft() -> SFT:
    return SFT(SFT.Config(lora=LORA, optim=optim()))


def train_sft(tiny_model: str, work: Path, adapter: Path) -> dict:
    return sft().train(ROWS, tiny_model, None, adapter, work, seed=0, round_index=1)


def tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    import torch

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in ta.items())  # trained, so equality means something
    assert all(torch.equal(ta[k], tb[k]) for k in ta), {k: (ta[k] - tb[k]).abs().max().item() for k in ta}


def step_losses(work: Path, step: int) -> dict[int, float]:
    history = json.loads((work / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def complete_checkpoints(work: Path) -> list[str]:
    return sorted(p.parent.name for p in work.glob(f"checkpoint-*/{COMPLETE}"))


@pytest.fixture
def steps_run(monkeypatch) -> list[int]:
    """The global step before each training step this process runs (one micro-batch per step here)."""
    from transformers import Trainer

    seen, original = [], Trainer.training_step

    def counting(self, *args, **kwargs):
        seen.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", counting)
    return seen


@pytest.fixture(scope="module")
def sft_runs(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """An uninterrupted SFT run, and the work folder of the same training SIGKILLed during step 5."""
    root = tmp_path_factory.mktemp("sft")
    full = train_sft(tiny_model, root / "full" / "work", root / "full" / "adapter")
    assert full["steps"] == 5 and full["resumed_from_step"] == 0
    killed = root / "killed" / "work"
    ready, log = root / "killed" / "ready", root / "killed" / "log"
    killed.mkdir(parents=True)
    kill_in_step("tests.test_train_resume", [tiny_model, str(killed)], ready, log)
    assert complete_checkpoints(killed) == ["checkpoint-2", "checkpoint-4"]
    assert not (root / "killed" / "adapter").exists()
    return SimpleNamespace(full=root / "full", killed=killed)


def test_killed_sft_resumes_from_its_newest_checkpoint_to_the_same_adapter(tiny_model, sft_runs, tmp_path, steps_run):
    work = tmp_path / "work"
    shutil.copytree(sft_runs.killed, work)
    metrics = train_sft(tiny_model, work, tmp_path / "adapter")
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 5
    assert steps_run == [4]  # only step 5 ran again: nothing replayed, nothing skipped
    assert_same_adapter(tmp_path / "adapter", sft_runs.full / "adapter")
    # every step saw the same batch with the same weights and dropout masks as in the uninterrupted run
    assert step_losses(work, 5) == step_losses(sft_runs.full / "work", 5)


def test_an_incomplete_newest_checkpoint_is_skipped(tiny_model, sft_runs, tmp_path, steps_run):
    work = tmp_path / "work"
    shutil.copytree(sft_runs.killed, work)
    # checkpoint-4 as a kill in the middle of writing it leaves it: a truncated optimizer state, no trainer state
    half = work / "checkpoint-4"
    (half / COMPLETE).unlink()
    (half / "trainer_state.json").unlink()
    optimizer = half / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    metrics = train_sft(tiny_model, work, tmp_path / "adapter")
    assert metrics["resumed_from_step"] == 2
    assert steps_run == [2, 3, 4]  # from mid-epoch 1 across the epoch boundary to the end
    assert_same_adapter(tmp_path / "adapter", sft_runs.full / "adapter")
    assert step_losses(work, 5) == step_losses(sft_runs.full / "work", 5)


def test_a_finished_training_killed_before_saving_its_adapter_trains_no_further(tiny_model, sft_runs, tmp_path,
                                                                               steps_run):
    work = tmp_path / "work"
    shutil.copytree(sft_runs.full / "work", work)  # it ends with checkpoint-5, written after the last step
    metrics = train_sft(tiny_model, work, tmp_path / "adapter")
    # step 5 is mid-epoch: the Trainer itself, resumed there, would run a sixth step
    assert metrics["resumed_from_step"] == 5 and metrics["steps"] == 5 and steps_run == []
    assert_same_adapter(tmp_path / "adapter", sft_runs.full / "adapter")


def test_resume_point_trusts_only_complete_checkpoints_of_the_same_training(tmp_path):
    training = {"config": {"learning_rate": 1e-3}, "rows": ROWS, "seed": 0}
    assert resume_point(tmp_path, training) is None  # an empty work folder: start from the beginning
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    _mark_complete(tmp_path / "checkpoint-2", 2)
    _mark_complete(tmp_path / "checkpoint-4", 4)
    (tmp_path / "checkpoint-6" / COMPLETE).write_text('{"step": 4}')  # a marker copied in from another folder
    (tmp_path / "checkpoint-8" / COMPLETE).write_text('{"st')  # cut short
    assert resume_point(tmp_path, training) == tmp_path / "checkpoint-4"
    assert complete_checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    assert not (tmp_path / "checkpoint-6").exists() and not (tmp_path / "checkpoint-8").exists()
    # another learning rate: the optimizer state in the checkpoints would bring the old one back
    assert resume_point(tmp_path, {**training, "config": {"learning_rate": 1e-4}}) is None
    assert not list(tmp_path.glob("checkpoint-*"))


def test_interrupted_dpo_against_its_starting_adapter_resumes_to_the_same_adapter(tiny_model, sft_runs, tmp_path,
                                                                                 monkeypatch):
    """DPO continuing an adapter against a frozen copy of it: the checkpoints hold that copy in a subfolder, where
    transformers, resuming, would load only the copy and leave the trained adapter at its starting weights."""
    from transformers import Trainer

    start = str(sft_runs.full / "adapter")
    config = DPO.Config(lora=LORA, optim=optim(), reference="policy")

    def train(name: str) -> dict:
        return DPO(config).train(PAIRS, tiny_model, start, tmp_path / name / "adapter", tmp_path / name / "work",
                                 seed=0, round_index=2, policy_adapter=start)

    full = train("full")
    assert full["reference"].endswith("(frozen adapter copy)") and full["resumed_from_step"] == 0

    class Interrupted(Exception):
        pass

    original = Trainer.training_step

    def interrupt_at_step_3(self, *args, **kwargs):
        if self.state.global_step == 2:
            raise Interrupted
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", interrupt_at_step_3)
    with pytest.raises(Interrupted):
        train("resumed")
    monkeypatch.setattr(Trainer, "training_step", original)
    assert complete_checkpoints(tmp_path / "resumed" / "work") == ["checkpoint-2"]

    resumed = train("resumed")
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 5
    assert_same_adapter(tmp_path / "resumed" / "adapter", tmp_path / "full" / "adapter")
    assert resumed["final_reward_margin"] == full["final_reward_margin"]
    assert not (tmp_path / "full" / "adapter" / "ref").exists()  # the frozen copy is not part of the result


def test_a_nan_loss_stops_training_before_it_reaches_the_adapter(tiny_model, tmp_path):
    import torch

    # lr 1e30 turns the LoRA weights into ~1e30 after one Adam step: attention scores overflow, the loss is NaN
    trainer = SFT(SFT.Config(lora=LORA, optim=optim(learning_rate=1e30, checkpoint_every=1)))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at optimizer step 2 of 5.*lower learning_rate"):
        trainer.train(ROWS, tiny_model, None, tmp_path / "adapter", tmp_path / "work", seed=0, round_index=1)
    assert not (tmp_path / "adapter").exists()
    # the only checkpoint is the one from before the NaN, and it is finite
    assert complete_checkpoints(tmp_path / "work") == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in tensors(tmp_path / "work" / "checkpoint-1").values())


if __name__ == "__main__":  # the child process of `sft_runs`: the same SFT training, killed in step 5
    tiny_model, work, ready = sys.argv[1:]
    hang_in_step(ready)
    train_sft(tiny_model, Path(work), Path(work).parent / "adapter")
