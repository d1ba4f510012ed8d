"""Training under several processes (trainers/launch.py) on the tiny model, on CPU: torchrun, DDP over gloo.

- Two processes train the same loss curve as one at the same global batch (8 = 4 per process): 24 rows, 4
  optimizer steps across an epoch boundary, LoRA dropout 0 (with dropout each process draws its own masks, so the
  curves would agree only statistically). Measured here: the largest difference between the two curves was
  2e-6 on losses of ~10.7 (float32 sums reduced in another order); the test allows 1e-4.
- The train stage with `launch: {num_processes: 2}`, given the launched training's work folder as a kill after
  step 2 leaves it, resumes both processes from checkpoint-2 and ends with the adapter of the uninterrupted run,
  bit for bit (its train.log shows the launch); the adapter loads with PEFT and the in-process vLLM engine serves
  it with the same greedy outputs as the one-process adapter.
- A process that fails stops the others, and the error names the stage, the exit code and the log file.
- Bad launch settings are refused when the pipeline loads, with the key and the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from selfimprove.config import ConfigError, build
from selfimprove.registry import TrainerSpec
from selfimprove.shipped import root
from selfimprove.trainers.common import Optimization

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = root() / "configs" / "accelerate"
SEED = 7
STEPS = 4
TOLERANCE = 1e-4  # on each logged loss (~10.7); measured differences are ~2e-6

ROWS = [{"prompt": [{"role": "user", "content": f"{a} + {a + 1} = ?"}],
         "completion": [{"role": "assistant", "content": f"It is {2 * a + 1}."}]} for a in range(24)]
TRAINER = {"name": "sft", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           # checkpoints after steps 2 and 4: the last one's trainer state holds the whole loss curve
           "optim": {"learning_rate": 1e-3, "max_steps": STEPS, "batch_size": 8, "logging_steps": 1,
                     "checkpoint_every": 2}}


def losses(work: Path) -> list[float]:
    history = json.loads((work / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def tensors(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> SimpleNamespace:
    """The same training in this process and under two processes, as the train stage calls each."""
    from selfimprove.artifacts import load_rows, save_rows
    from selfimprove.trainers.launch import Launch, run

    root = tmp_path_factory.mktemp("launch")
    save_rows(ROWS, root / "filter" / "data")
    rows = load_rows(root / "filter" / "data")  # as the stage reads them
    spec = TrainerSpec.from_config(TRAINER, "<test>", "trainer")
    one = spec.build().train(rows, tiny_model, None, root / "one" / "adapter", root / "one" / "work", seed=SEED,
                             round_index=1)
    started = time.time()
    two = run(Launch(num_processes=2), spec, rows, tiny_model, None, root / "two" / "adapter", root / "two" / "work",
              SEED, 1, None, log_file=root / "two" / "train.log", label="stage train (round 1)")
    return SimpleNamespace(root=root, one=one, two=two, launch_seconds=time.time() - started)


def test_two_processes_train_the_loss_curve_of_one_at_the_same_global_batch(runs):
    one, two = losses(runs.root / "one" / "work"), losses(runs.root / "two" / "work")
    assert len(one) == len(two) == STEPS
    assert one[-1] < one[0]  # it trained
    assert max(abs(a - b) for a, b in zip(one, two)) < TOLERANCE, (one, two)
    assert two != [one[0]] * STEPS  # the curve moves, so agreement is not agreement of constants
    assert runs.two["processes"] == 2 and runs.two["steps"] == STEPS and runs.two["examples"] == len(ROWS)
    # each process got 4 of the global 8: the trainer spec each process re-resolved says so
    spec = json.loads((runs.root / "two" / "work" / "launch" / "spec.json").read_text())
    assert spec["trainer"]["optim"]["batch_size"] == 4 and spec["global_batch_size"] == 8
    a, b = tensors(runs.root / "one" / "adapter"), tensors(runs.root / "two" / "adapter")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    # only rank 0 saved: no other process left an adapter behind
    assert not list((runs.root / "two" / "work" / "launch").glob(".rank*-adapter"))
    log = (runs.root / "two" / "train.log").read_text()
    assert "--start torchrun --standalone --nproc_per_node 2" in log and "'loss'" in log


@pytest.fixture(scope="module")
def stage_run(runs, tiny_model) -> SimpleNamespace:
    """The train stage with `launch: {num_processes: 2}`, on the launched run's work folder as a kill during step 3
    leaves it (checkpoint-2 complete, nothing after it)."""
    from selfimprove.records import Weights
    from selfimprove.stages.train import Train

    out = runs.root / "stage"
    shutil.copytree(runs.root / "two" / "work", out / "trainer", ignore=shutil.ignore_patterns("launch"))
    shutil.rmtree(out / "trainer" / f"checkpoint-{STEPS}")
    config = build(Train.Config, {"trainer": TRAINER, "launch": {"num_processes": 2}}, "<test>", "stages.train")
    ctx = SimpleNamespace(round=1, stage="train", out_dir=out, base_model=tiny_model,
                          seed=lambda *parts: SEED, input_dir=lambda name: runs.root / name,
                          weights=lambda which: Weights(tiny_model))
    metrics = Train(config, ctx).run()
    return SimpleNamespace(out=out, metrics=metrics)


def test_the_train_stage_launches_and_resumes_from_the_launched_checkpoints(runs, stage_run):
    m = stage_run.metrics
    assert m["trained"] and m["processes"] == 2
    assert m["resumed_from_step"] == 2 and m["steps"] == STEPS  # steps 3 and 4 ran again, nothing else
    assert m["final_loss"] == runs.two["final_loss"]
    a, b = tensors(stage_run.out / "adapter"), tensors(runs.root / "two" / "adapter")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # the uninterrupted run's, bit for bit
    weights = json.loads((stage_run.out / "weights.json").read_text())
    assert weights["adapter"] == str(stage_run.out / "adapter") and weights["trained"]
    assert "--nproc_per_node 2" in (stage_run.out / "train.log").read_text()
    assert not (stage_run.out / "trainer").exists()  # the work folder goes once the adapter is written


def test_the_launched_adapter_loads_and_is_served(runs, stage_run, tiny_model, engine):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from selfimprove.records import SamplingConfig, Weights

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(stage_run.out / "adapter"))
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())  # trained
    prompts = [r["prompt"] for r in ROWS[:4]]
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=12)

    def texts(adapter: Path) -> list[str]:
        out = engine.generate(prompts, greedy, Weights.of(tiny_model, str(adapter)), seed=0)
        return [c[0].text for c in out]

    assert texts(stage_run.out / "adapter") == texts(runs.root / "one" / "adapter")


@dataclass
class _Config:
    optim: Optimization = field(default_factory=lambda: Optimization(batch_size=2))


class RankOneFails:
    """A trainer whose rank 1 fails at once while rank 0 would run on for two minutes."""

    Config = _Config

    def __init__(self, config):
        self.config = config

    def train(self, rows, base_path, init_adapter, adapter_out, work_dir, seed, round_index, policy_adapter=None):
        if os.environ["RANK"] == "1":
            raise RuntimeError("rank 1 gives up")
        time.sleep(120)
        return {"examples": len(rows)}


def test_a_failing_process_stops_the_others_and_the_error_names_stage_exit_code_and_log(tmp_path, tiny_model):
    from selfimprove.trainers.launch import Launch, LaunchFailed, run

    spec = TrainerSpec.from_config({"name": "tests.test_launch:RankOneFails"}, "<test>", "trainer")
    started = time.time()
    with pytest.raises(LaunchFailed) as caught:
        run(Launch(num_processes=2), spec, ROWS[:4], tiny_model, None, tmp_path / "adapter", tmp_path / "work", 0, 3,
            None, log_file=tmp_path / "stage" / "train.log", label="stage train (round 3)")
    assert time.time() - started < 100  # rank 0 was stopped, not waited for
    message = str(caught.value)
    assert message.startswith("stage train (round 3): training under 2 processes failed: torchrun exited with code 1")
    assert "rank 1 (exit code 1): RuntimeError: rank 1 gives up" in message
    assert "rank 0 (exit code -15: SIGTERM): stopped by SIGTERM (by the launcher" in message  # stopped by torchrun
    failures = json.loads((tmp_path / "work" / "launch" / "failures.json").read_text())  # the elastic agent's record
    assert failures["1"]["exitcode"] == 1 and 'raise RuntimeError("rank 1 gives up")' in failures["1"]["traceback"]
    assert f"Full log: {tmp_path / 'stage' / 'train.log'}" in message
    assert "rank 1 gives up" in (tmp_path / "stage" / "train.log").read_text()
    assert not (tmp_path / "adapter").exists()


# --- config load -------------------------------------------------------------------------------------------


def load_with(tmp_path: Path, launch, trainer_optim: dict | None = None):
    from selfimprove.pipeline import load_pipeline
    from selfimprove.yamlio import load_yaml

    base = load_yaml(REPO / "tests" / "pipelines" / "tiny_star.yaml")
    base["stages"]["train"]["launch"] = launch
    if trainer_optim:
        base["stages"]["train"]["trainer"]["optim"].update(trainer_optim)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return load_pipeline(path)


def accelerate_file(tmp_path: Path, **changes) -> str:
    config = yaml.safe_load((ACCELERATE / "ddp.yaml").read_text())
    path = tmp_path / "acc.yaml"
    path.write_text(yaml.safe_dump({**config, **changes}))
    return str(path)


@pytest.mark.parametrize("name", ["ddp", "deepspeed_zero2"])
def test_replicating_accelerate_configs_load(tmp_path, name):
    pipeline = load_with(tmp_path, {"config": str(ACCELERATE / f"{name}.yaml"), "num_processes": 2})
    launch = pipeline.config.stages["train"].config.launch
    assert launch.num_processes == 2 and launch.config.endswith(f"{name}.yaml")


def test_one_process_trains_in_the_stage_and_reads_no_config(tmp_path):
    # what `stages.train.launch.num_processes=1` does to a pipeline that launches: the launcher is off
    pipeline = load_with(tmp_path, {"config": str(tmp_path / "absent.yaml"), "num_processes": 1})
    assert pipeline.config.stages["train"].config.launch.num_processes == 1


@pytest.mark.parametrize("launch, optim, message", [
    ({"num_processes": 0}, None, r"launch\.num_processes must be >= 1"),
    ({"num_processes": 3}, None,
     r"launch\.num_processes 3 does not divide trainer\.optim\.batch_size 4.*batch_size / num_processes per "
     r"process.*multiple of 3.*num_processes in \[2, 4\]"),
    ({"num_processes": 2}, {"batch_size": 5}, r"does not divide trainer\.optim\.batch_size 5"),
    ({"num_processes": 2, "nodes": 2}, None,
     r"launch\.nodes: unknown key; valid keys of Launch: config, num_processes"),
    ({"config": "no/such.yaml", "num_processes": 2}, None, r"launch\.config: no file 'no/such\.yaml'"),
    ({"config": str(ACCELERATE / "fsdp.yaml"), "num_processes": 2}, None,
     r"distributed_type FSDP shards the parameters.*save_adapter.*ddp\.yaml or deepspeed_zero2\.yaml"),
    ({"config": str(ACCELERATE / "deepspeed_zero3.yaml"), "num_processes": 2}, None,
     r"distributed_type DEEPSPEED \(ZeRO-3\) shards the parameters"),
])
def test_bad_launch_settings_are_refused_at_load(tmp_path, launch, optim, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_with(tmp_path, launch, optim)
    assert "stages.train" in str(caught.value)  # where in the file


@pytest.mark.parametrize("changes, message", [
    ({"num_gpus": 2}, r"not an accelerate config accelerate can read.*unknown keys \(\['num_gpus'\]\)"),
    ({"distributed_type": "NO"}, r"distributed_type NO is not one this launcher runs.*NO starts a single process"),
    ({"distributed_type": "MULTI_GPUS"}, r"not an accelerate config accelerate can read.*MULTI_GPUS"),
    ({"machine_rank": 1}, r"machine_rank must be 0"),
    ({"num_machines": 2}, r"num_machines 2 needs a launcher that starts the other machines' processes.*pdsh"),
])
def test_bad_accelerate_files_are_refused_at_load(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_with(tmp_path, {"config": accelerate_file(tmp_path, **changes), "num_processes": 2})


def test_several_machines_need_a_hostfile_and_a_process_count_they_share(tmp_path):
    config = yaml.safe_load((ACCELERATE / "deepspeed_zero2.yaml").read_text())
    config["num_machines"] = 2
    config["deepspeed_config"]["deepspeed_multinode_launcher"] = "pdsh"
    path = tmp_path / "ds.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"num_machines 2 needs deepspeed_config\.deepspeed_hostfile"):
        load_with(tmp_path, {"config": str(path), "num_processes": 4}, {"batch_size": 8})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    config["deepspeed_config"]["deepspeed_hostfile"] = str(hostfile)
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"launch\.num_processes 3 is not a multiple of the config's num_machines 2"):
        load_with(tmp_path, {"config": str(path), "num_processes": 3}, {"batch_size": 6})
    assert load_with(tmp_path, {"config": str(path), "num_processes": 4}, {"batch_size": 8})
