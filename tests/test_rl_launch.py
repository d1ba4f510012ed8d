"""The rl stage under several processes (trainers/rl_launch.py) on the tiny model, on CPU: torchrun, gloo.

- Whole groups are dealt out to the processes by token count (a hand-worked split).
- Two processes make the same two updates as one on hand-made rollouts of three groups with different rewards
  (KL term on, micro-batches of 2, sampler log-probabilities on one group): the same metrics and, after two
  steps, the same adapter within float summation order.
- The tiny GRPO pipeline with `stages.rl.launch={num_processes: 2}` runs end to end, synchronously and with
  `max_staleness: 1`; its train.log shows the launch and the work folder goes when the stage ends.
- Rank 1 SIGKILLed in the middle of the second step fails the stage naming rank 1 and the signal; the rerun
  resumes from version 1 and ends with the uninterrupted launched run's adapter, bit for bit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, read_json
from selfimprove.pipeline import Runner, StageFailed, load_pipeline
from selfimprove.records import Rollout, adapter_hash
from selfimprove.registry import TrainerSpec
from selfimprove.trainers.rl import PolicyGradient
from selfimprove.trainers.rl_launch import Shard

REPO = Path(__file__).resolve().parents[1]
TINY_GRPO = REPO / "tests" / "pipelines" / "tiny_grpo.yaml"
TRAINER = {"name": "policy_gradient", "learning_rate": 2e-2, "micro_batch_size": 2, "lora": {"r": 4, "alpha": 8}}
KL = [0.05]
TOLERANCE = 1e-5  # on metrics and adapter entries; float32 sums reduced in another order differ by ~1e-7
LAUNCHED = ["rounds=1", "evaluate_base=false", "stages.rl.launch={num_processes: 2}"]
KILL_MARK = "SELFIMPROVE_TEST_KILL_MARK"


def quiet(*_):
    pass


def test_whole_groups_are_dealt_out_largest_first_to_the_least_loaded_process():
    groups = ["a", "b", "a", "c", "d", "b", "c"]
    sizes = [5, 3, 5, 4, 1, 3, 4]  # tokens: a 10, c 8, b 6, d 1
    # a -> rank 0 (10); c -> rank 1 (8); b -> rank 1 (14); d -> rank 0 (11)
    assert Shard(0, 2).mine(groups, sizes) == [0, 2, 4]
    assert Shard(1, 2).mine(groups, sizes) == [1, 3, 5, 6]
    assert Shard(2, 3).mine(groups, sizes) == [1, 4, 5]  # a, c, b to ranks 0, 1, 2; d to rank 2 (6 < 8 < 10)
    assert Shard(0, 1).mine(groups, sizes) == list(range(7))


def rollouts(tokenizer, version: str) -> list[Rollout]:
    def chat(question):
        return [{"role": "user", "content": question}]

    sampled = [tokenizer.encode(text, add_special_tokens=False) for text in ("5", "It is 5.", "six")]
    return [
        *(Rollout("a", [chat("What is 2 + 3?")], [text], [True], [reward], version, [ids], [[-1.5] * len(ids)])
          for text, reward, ids in zip(("5", "It is 5.", "six"), (1.0, 0.5, 0.0), sampled)),
        *(Rollout("b", [chat("What is 4 + 4?")], [text], [eos], [reward], version)
          for text, eos, reward in (("8", True, 1.0), ("It is nine", False, 0.0))),
        *(Rollout("c", [chat("Name a prime.")], [text], [True], [reward], version)
          for text, reward in (("7", 2.0), ("Nine.", 0.0), ("Two, the only even one.", 1.0))),
    ]


def two_steps(trainer, tokenizer, folder: Path) -> list[dict]:
    """Two updates, each on rollouts of the version saved before it; the metrics of each."""
    out = []
    for k in (1, 2):
        out.append(trainer.step(rollouts(tokenizer, trainer.version), KL, temperature=1.0, max_tokens=8))
        trainer.save(folder / f"v{k}")
    return out


def test_two_processes_make_the_updates_of_one(tiny_model, tmp_path):
    from safetensors.torch import load_file

    from selfimprove.trainers.launch import Launch
    from selfimprove.trainers.rl_launch import LaunchedPolicy

    spec = TrainerSpec.from_config(TRAINER, "<test>", "trainer")
    one = spec.build()
    one.setup(tiny_model, None, seed=3)
    one.save(tmp_path / "one" / "v0")
    expected = two_steps(one, one.tokenizer, tmp_path / "one")

    with LaunchedPolicy(Launch(num_processes=2), spec, tmp_path / "two" / "work", tmp_path / "two" / "train.log",
                        "test") as two:
        two.setup(tiny_model, None, seed=3)
        assert two.version is None and two.history == []  # a fresh LoRA, as in one process: unsaved
        v0 = two.save(tmp_path / "two" / "v0")
        assert v0 == adapter_hash(tmp_path / "one" / "v0" / "adapter")  # the same seeded initialisation
        got = two_steps(two, one.tokenizer, tmp_path / "two")
        assert two.history[0] == v0 and len(two.history) == 3 and two.version == two.history[-1]
    assert not (tmp_path / "two" / "work").exists()  # stopped cleanly: the work folder went

    for mine, theirs in zip(got, expected):
        assert mine.keys() == theirs.keys()
        assert mine["tokens"] == theirs["tokens"] > 0
        assert mine["grad_norm"] > 0 and mine["sampler_gap/max_abs"] > 0 and mine["kl/attempt1"] is not None
        for key in ("loss", "grad_norm", "kl/attempt1", "sampler_gap/mean_abs", "sampler_gap/max_abs",
                    "sampler_gap/kl"):
            assert mine[key] == pytest.approx(theirs[key], rel=TOLERANCE, abs=TOLERANCE), key
    assert got[1]["kl/attempt1"] > 0  # the second step starts from a moved policy
    a, b = (load_file(tmp_path / side / "v2" / "adapter" / "adapter_model.safetensors") for side in ("one", "two"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < TOLERANCE
    moved = load_file(tmp_path / "one" / "v0" / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - moved[k]).abs().max().item() for k in a) > 100 * TOLERANCE  # agreement is not of constants
    log = (tmp_path / "two" / "train.log").read_text()
    assert "--start torchrun --standalone --nproc_per_node 2" in log and "selfimprove.trainers.rl_launch" in log


# --- the rl stage -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launched_run(engine, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("rl_launch") / "run"
    Runner(load_pipeline(TINY_GRPO, LAUNCHED), run_dir, engine=engine, log=quiet).run()
    return run_dir


def test_the_rl_stage_trains_under_two_processes(launched_run):
    rl = launched_run / "round_001" / "rl"
    manifest = read_json(rl / "manifest.json")
    assert manifest["metrics"]["steps"] == 2
    versions = [adapter_hash(rl / "versions" / f"{v:05d}" / "adapter") for v in range(3)]
    assert len(set(versions)) == 3  # each step moved the policy
    rows = load_rows(rl / "data")
    for step in (0, 1):  # each step sampled with the version the step before committed
        assert {row["weights"]["adapter_hash"] for row in rows if row["step"] == step} == {versions[step]}
        metrics = read_json(rl / "versions" / f"{step + 1:05d}" / "step.json")
        assert metrics["grad_norm"] > 0 and metrics["tokens"] > 0 and metrics["policy_version"] == versions[step]
    assert adapter_hash(rl / "adapter") == versions[2]
    assert "--nproc_per_node 2" in (rl / "train.log").read_text()
    assert not (rl / "trainer").exists()  # the workers stopped cleanly and their work folder went
    assert read_json(launched_run / "round_001" / "evaluate" / "manifest.json")["metrics"]["weights"] == \
        "round_001/rl"


def test_the_launched_rl_stage_samples_ahead_with_max_staleness(engine, tmp_path):
    Runner(load_pipeline(TINY_GRPO, [*LAUNCHED, "stages.rl.steps=3", "stages.rl.max_staleness=1"]), tmp_path / "run",
           engine=engine, log=quiet).run()
    rl = tmp_path / "run" / "round_001" / "rl"
    versions = [adapter_hash(rl / "versions" / f"{v:05d}" / "adapter") for v in range(4)]
    steps = [read_json(rl / "versions" / f"{v:05d}" / "step.json") for v in (1, 2, 3)]
    assert [s["staleness"] for s in steps] == [0, 1, 1]
    assert [s["policy_version"] for s in steps] == [versions[0], versions[0], versions[1]]
    assert len(set(versions)) == 4 and all(s["grad_norm"] > 0 for s in steps)


class KilledOnce(PolicyGradient):
    """policy_gradient whose rank 1 SIGKILLs itself as its second step starts (rank 0 is then inside the step,
    waiting for rank 1's gradients), once: while the file named by $SELFIMPROVE_TEST_KILL_MARK exists."""

    def step(self, *args, **kwargs):
        mark = Path(os.environ.get(KILL_MARK, "/nonexistent"))
        if os.environ.get("RANK") == "1" and len(self.history) == 2 and mark.exists():
            mark.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().step(*args, **kwargs)


def test_a_killed_rank_fails_the_stage_by_name_and_the_rerun_resumes(engine, launched_run, tmp_path, monkeypatch):
    mark = tmp_path / "kill"
    mark.touch()
    monkeypatch.setenv(KILL_MARK, str(mark))
    trainer = "stages.rl.trainer={name: 'tests.test_rl_launch:KilledOnce', learning_rate: 5.0e-3, baseline: rloo, " \
              "lora: {r: 4, alpha: 8}}"
    overrides = [*LAUNCHED, trainer]
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed) as caught:
        Runner(load_pipeline(TINY_GRPO, overrides), run_dir, engine=engine, log=quiet).run()
    message = str(caught.value)
    assert "stage rl (round 1): training under 2 processes failed: torchrun exited with code 1" in message
    assert "rank 1 (exit code -9: SIGKILL): killed by SIGKILL (not the launcher's signal" in message
    assert not mark.exists()  # it was rank 1 of the second step that died
    rl = run_dir / "round_001" / "rl"
    assert sorted(p.name for p in (rl / "versions").glob("[0-9]*")) == ["00000", "00001"]  # step 2 not kept
    assert (rl / "trainer" / "launch" / "failures.json").exists()

    Runner(load_pipeline(TINY_GRPO, overrides), run_dir, engine=engine, log=quiet).run()
    assert read_json(rl / "manifest.json")["metrics"]["steps"] == 2
    uninterrupted = launched_run / "round_001" / "rl"
    assert adapter_hash(rl / "adapter") == adapter_hash(uninterrupted / "adapter")
    def sampled(run: Path) -> list[tuple]:  # what was sampled with which version, wherever the run lives
        return [(r["sample_id"], r["completion"], r["rewards"], r["weights"]["adapter_hash"])
                for r in load_rows(run / "data")]

    assert sampled(rl) == sampled(uninterrupted)
    assert (rl / "train.log").read_text().count("--nproc_per_node 2") == 2  # the rerun launched again
