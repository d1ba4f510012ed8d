"""ReST-MCTS*'s loop: train_prm's `init: previous` continues the previous round's PRM (its weights bit for bit
at learning rate 0, its fit as the first loss, its lineage in weights.json) and resumes only checkpoints of the
same start."""

from __future__ import annotations

import shutil
from pathlib import Path

from selfimprove.artifacts import read_json, save_rows
from selfimprove.config import build
from selfimprove.pipeline import derive_seed
from selfimprove.records import Weights
from selfimprove.stages.prm import TrainPRM
from tests.test_prm import PRM_EXAMPLES, prm_settings



def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Context:
    """The runner's part for one train_prm stage: its round's folder, the step-label rows, and `weights`, which
    gives `previous` (the Weights the runner would find for this stage in an earlier round) or the base."""

    def __init__(self, root: Path, base_model: str, round_index: int, previous: Weights | None = None):
        self.root, self.base_model, self.round, self.stage = root, base_model, round_index, "train_prm"
        self.out_dir = root / f"round_{round_index:03d}" / "train_prm"
        self.previous, self.asked = previous, []

    def seed(self, *parts):
        # The round left out: every round holds out the same problems, so round 2 trains on round 1's examples.
        return derive_seed(0, self.stage, *parts)

    def weights(self, which):
        self.asked.append(which)
        if which == self.stage and self.previous is not None:
            return self.previous
        return Weights(self.base_model)

    def input_dir(self, stage):
        return self.root / stage


def label_rows(root: Path) -> None:
    """PRM_EXAMPLES as a step_labels stage's rows, one problem each."""
    save_rows([{"problem_id": f"p{i}", "sample_id": f"s{i}", "prompt": e["prompt"], "steps": e["steps"],
                "soft": e["targets"], "hard": [t >= 0.5 for t in e["targets"]], "oracle": None}
               for i, e in enumerate(PRM_EXAMPLES)], root / "step_labels" / "data")


def run_stage(ctx: Context, init: str, **optim) -> dict:
    """The stage on the 4 problems it does not hold out, in one batch of 4."""
    optim = {"learning_rate": 1e-2, "batch_size": 4, "logging_steps": 1, "checkpoint_every": 0, **optim}
    config = build(TrainPRM.Config, {"init": init, "held_out": 0.34, "training": {
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "optim": optim}}, "test")
    return TrainPRM(config, ctx).run()


def test_init_previous_continues_the_previous_rounds_prm(tiny_model, tmp_path):
    """Round 1 (no earlier PRM) fits a fresh one on 4 of the 6 problems. Round 2 with `init: previous` at learning
    rate 0 saves round 1's adapter unchanged, head included; with a learning rate its first loss on the same
    examples is round 1's fit, and both the head and the LoRA weights move on; `init: base` at learning rate 0
    saves a fresh adapter instead."""
    import torch

    label_rows(tmp_path)
    first = Context(tmp_path, tiny_model, 1)
    m1 = run_stage(first, "previous", max_steps=30)
    assert first.asked == ["train_prm"]  # round 1 asks too: the runner answers with the base
    w1 = read_json(first.out_dir / "weights.json")
    assert w1["init"] == Weights(tiny_model).to_dict() and w1["label"] == "round_001/train_prm"
    assert m1["final_loss"] < m1["first_loss"] / 4  # the fit round 2 should start from
    previous = Weights.from_dict(w1)
    a1 = adapter_tensors(first.out_dir / "adapter")

    frozen = Context(tmp_path / "lr0", tiny_model, 2, previous)
    label_rows(frozen.root)
    run_stage(frozen, "previous", max_steps=2, learning_rate=0.0)
    assert same_tensors(adapter_tensors(frozen.out_dir / "adapter"), a1) and any("score" in k for k in a1)
    assert read_json(frozen.out_dir / "weights.json")["init"] == previous.to_dict()

    continued = Context(tmp_path / "lr", tiny_model, 2, previous)
    label_rows(continued.root)
    m2 = run_stage(continued, "previous", max_steps=2)
    assert m2["first_loss"] < m1["first_loss"] / 4  # a fresh head starts near log 2, as round 1 did
    a2 = adapter_tensors(continued.out_dir / "adapter")
    changed = {k for k in a1 if not torch.equal(a1[k], a2[k])}
    assert any("score" in k for k in changed) and any("lora_" in k for k in changed)  # both keep training

    fresh = Context(tmp_path / "base", tiny_model, 2, previous)
    label_rows(fresh.root)
    run_stage(fresh, "base", max_steps=2, learning_rate=0.0)
    assert fresh.asked == ["base"]
    assert not same_tensors(adapter_tensors(fresh.out_dir / "adapter"), a1)
    assert read_json(fresh.out_dir / "weights.json")["init"]["adapter"] is None


def test_a_continued_training_resumes_only_its_own_start(tiny_model, tmp_path):
    """Checkpoints in the work folder belong to one start: a training from another adapter (or from the same
    folder after its content changed) discards them and starts at step 0; the same start resumes them."""
    from selfimprove.prm import train

    settings = prm_settings(max_steps=4, batch_size=2, checkpoint_every=2, learning_rate=1e-2)
    work = tmp_path / "work"

    def fit(name: str, init: Path | None, work_dir: Path = work, seed: int = 0) -> dict:
        return train(PRM_EXAMPLES, tiny_model, tmp_path / name, work_dir, seed=seed, settings=settings,
                     init_adapter=str(init) if init else None)

    fit("a", None, tmp_path / "a_work", seed=1)  # the start to continue
    assert fit("fresh", None)["resumed_from_step"] == 0  # leaves checkpoint-2 and checkpoint-4 in `work`
    continued = fit("continued", tmp_path / "a")
    assert continued["resumed_from_step"] == 0 and continued["steps"] == 4
    assert not same_tensors(adapter_tensors(tmp_path / "continued"), adapter_tensors(tmp_path / "fresh"))
    again = fit("again", tmp_path / "a")  # the same start: its finished checkpoint is resumed
    assert again["resumed_from_step"] == 4
    assert same_tensors(adapter_tensors(tmp_path / "again"), adapter_tensors(tmp_path / "continued"))
    shutil.rmtree(tmp_path / "a")
    shutil.copytree(tmp_path / "fresh", tmp_path / "a")  # the same path, another adapter
    assert fit("changed", tmp_path / "a")["resumed_from_step"] == 0
