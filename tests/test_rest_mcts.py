"""ReST-MCTS*'s loop (pipelines/rest_mcts_arithmetic.yaml): train_prm's `init: previous` continues the previous
round's PRM (its weights bit for bit at learning rate 0, its fit as the first loss, its lineage in weights.json),
resumes only checkpoints of the same start; the shipped pipeline passes --check; the tiny loop runs both rounds
end to end on the tiny random model, and a redone round-2 train_prm continues the same adapter again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, read_json, save_rows
from selfimprove.config import build
from selfimprove.pipeline import derive_seed
from selfimprove.records import Weights
from selfimprove.stages.prm import TrainPRM
from tests.test_prm import PRM_EXAMPLES, prm_settings

REPO = Path(__file__).resolve().parents[1]


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


def test_the_shipped_pipeline_passes_check():
    proc = subprocess.run([sys.executable, "-m", "selfimprove.cli", "run", "rest_mcts_arithmetic", "--check"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "ok (8 stages x 2 rounds)" in proc.stdout


@pytest.fixture(scope="module")
def loop_run(engine, tmp_path_factory) -> Path:
    from selfimprove.pipeline import Runner, load_pipeline

    run = tmp_path_factory.mktemp("rest_mcts") / "run"
    Runner(load_pipeline(REPO / "tests" / "pipelines" / "tiny_rest_mcts.yaml"), run, engine=engine,
           log=lambda *_: None).run()
    return run


def test_the_tiny_loop_end_to_end(loop_run):
    """Two rounds of generate → step_labels → train_prm → search_train → critique → filter → train → evaluate on
    the tiny random model: each round's search runs with the round's policy and PRM, the PRM continues round 1's,
    the policy trains from the base on that round's searched traces, and evaluate reads the round's policy."""
    def stage(r: int, name: str) -> Path:
        return loop_run / f"round_{r:03d}" / name

    assert sorted(p.name for p in (loop_run / "round_000").iterdir()) == ["evaluate"]
    prm1, prm2 = (read_json(stage(r, "train_prm") / "weights.json") for r in (1, 2))
    assert prm1["init"]["label"] == "base" and prm1["init"]["adapter"] is None
    assert prm2["init"] == {k: prm1[k] for k in ("base", "adapter", "label", "adapter_hash")}
    assert prm2["adapter_hash"] != prm1["adapter_hash"]  # and it trained on
    for r, policy in ((1, "base"), (2, "round_001/train")):
        for name in ("generate", "search_train"):
            assert {row["weights"]["label"] for row in load_rows(stage(r, name) / "data")} == {policy}, (r, name)
        searched = load_rows(stage(r, "search_train") / "data")
        assert {row["search"]["strategy"] for row in searched} == {"tree"}
        assert len({row["problem_id"] for row in searched}) == 3
        verdicts = load_rows(stage(r, "critique") / "data")
        assert sorted(v["sample_id"] for v in verdicts) == sorted(row["sample_id"] for row in searched)
        kept = load_rows(stage(r, "filter") / "data")
        assert kept and {i for row in kept for i in row["sample_ids"]} <= {row["sample_id"] for row in searched}
        assert all(row["source"] == "search_train" for row in kept)
        train = read_json(stage(r, "train") / "weights.json")
        assert train["trained"] and train["init"]["label"] == "base"  # the policy's SFT restarts from the base
        assert train["policy"]["label"] == policy
    for r, weights in ((0, "base"), (1, "round_001/train"), (2, "round_002/train")):
        assert read_json(stage(r, "evaluate") / "manifest.json")["metrics"]["weights"] == weights


def test_a_redone_round_2_prm_continues_the_same_adapter(loop_run, engine):
    """A round-2 train_prm run again (its manifest gone, as after a kill before it was recorded) finds round 1's
    adapter again and, training being deterministic on CPU, ends with the same PRM."""
    from selfimprove.pipeline import Runner, load_pipeline

    folder = loop_run / "round_002" / "train_prm"
    before = read_json(folder / "weights.json")
    (folder / "manifest.json").unlink()
    Runner(load_pipeline(REPO / "tests" / "pipelines" / "tiny_rest_mcts.yaml"), loop_run, engine=engine,
           log=lambda *_: None).run()
    after = read_json(folder / "weights.json")
    assert after["init"] == before["init"] and after["adapter_hash"] == before["adapter_hash"]
