"""A real pipeline end to end on the tiny model (real vLLM, real TRL), and resume after a kill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, read_json, read_jsonl
from selfimprove.pipeline import Runner, load_pipeline

REPO = Path(__file__).resolve().parents[1]
TINY_STAR = REPO / "tests" / "pipelines" / "tiny_star.yaml"
STAGES = ["generate", "critique", "rationalize", "critique_rationalize", "filter", "train", "evaluate"]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def star_run(engine, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("star") / "run"
    results = Runner(load_pipeline(TINY_STAR), run_dir, engine=engine, log=quiet).run()
    return run_dir, results


def test_two_round_star_writes_every_artifact(star_run):
    run_dir, results = star_run
    assert (run_dir / "config.yaml").exists() and (run_dir / "versions.json").exists()
    assert read_json(run_dir / "round_000" / "evaluate" / "manifest.json")["done"]
    assert [r["round"] for r in results] == [0, 1, 2]
    for r in (1, 2):
        for stage in STAGES:
            manifest = read_json(run_dir / f"round_{r:03d}" / stage / "manifest.json")
            assert manifest["done"] and manifest["seconds"] > 0, (r, stage)
    # the watchdog's memory samples: the run's processes together, at least the main process's own size
    train = read_json(run_dir / "round_001" / "train" / "manifest.json")
    assert train["peak_memory_mib"] >= 0.5 * train["peak_rss_mib"] > 0
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert len(lines) == 1 + 2 * len(STAGES)
    assert "accuracy_ci_low" in lines[0] and (run_dir / "report.md").read_text().count("\n") >= 5
    assert "![accuracy](plots/accuracy.png)" in (run_dir / "report.md").read_text()
    assert (run_dir / "plots" / "accuracy.png").stat().st_size > 0


def test_samples_verdicts_and_selection(star_run):
    run_dir, _ = star_run
    r1 = run_dir / "round_001"
    samples = load_rows(r1 / "generate" / "data")
    assert len(samples) == 16 * 2 and len({s["sample_id"] for s in samples}) == 32
    assert {(s["weights"]["label"], s["weights"]["adapter_hash"]) for s in samples} == {("base", None)}
    verdicts = load_rows(r1 / "critique" / "data")
    assert len(verdicts) == 32 and {v["critic"] for v in verdicts} == {"tests.plugins:accept_even_problems"}
    # rationalization covers exactly the problems the critic left unsolved, with the hint in the prompt
    unsolved = {s["problem_id"] for s in samples if int(s["problem_id"][-1]) % 2}
    rationalized = load_rows(r1 / "rationalize" / "data")
    assert {s["problem_id"] for s in rationalized} == unsolved
    assert all(s["hint"] and "The correct answer is" in s["prompt"][-1]["content"] for s in rationalized)
    # the training set keeps both sources and drops the hint from rationalized prompts
    train = load_rows(r1 / "filter" / "data")
    assert {t["source"] for t in train} == {"generate", "rationalize"}
    assert all("The correct answer is" not in t["prompt"][-1]["content"] for t in train)
    assert all(len(t["sample_ids"]) == 1 for t in train)
    # the B-STaR monitor on the round's own samples: what was kept of them, graded by the task (the random model
    # is never right, so nothing kept is correct and the balance score is 0)
    monitor = read_json(r1 / "filter" / "manifest.json")["metrics"]
    assert monitor["bstar/kept"] == sum(t["source"] == "generate" for t in train) > 0
    assert monitor["bstar/prompts"] == 16 and monitor["bstar/balance"] == 0.0 and monitor["bstar/precision"] == 0.0


def test_rounds_chain_weights(star_run):
    run_dir, _ = star_run
    w1 = read_json(run_dir / "round_001" / "train" / "weights.json")
    w2 = read_json(run_dir / "round_002" / "train" / "weights.json")
    assert w1["trained"] and w2["trained"] and w1["adapter_hash"] != w2["adapter_hash"]
    assert w2["init"]["adapter"] is None  # STaR: every round restarts from the base model
    gen2 = load_rows(run_dir / "round_002" / "generate" / "data")
    # round 2 samples from round 1's model, and every sample carries that model's identity
    assert {(s["weights"]["label"], s["weights"]["adapter_hash"]) for s in gen2} == {("round_001/train", w1["adapter_hash"])}
    ev2 = read_json(run_dir / "round_002" / "evaluate" / "manifest.json")
    assert ev2["metrics"]["weights"] == "round_002/train"


def test_rerun_skips_finished_stages(star_run, engine):
    run_dir, _ = star_run
    before = {p: p.stat().st_mtime for p in run_dir.glob("round_*/*/manifest.json")}
    # as a kill right after the last manifest leaves it: metrics.jsonl without its last line
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:-1]))
    logs = []
    Runner(load_pipeline(TINY_STAR), run_dir, engine=engine, log=logs.append).run()
    after = {p: p.stat().st_mtime for p in run_dir.glob("round_*/*/manifest.json")}
    assert before == after
    assert sum("done, skipped" in str(line) for line in logs) == 1 + 2 * len(STAGES)
    assert (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True) == lines


def test_changed_config_is_refused(star_run, engine):
    from selfimprove.config import ConfigError

    run_dir, _ = star_run
    with pytest.raises(ConfigError, match="different config.*seed"):
        Runner(load_pipeline(TINY_STAR, ["seed=5"]), run_dir, engine=engine, log=quiet).run()


def test_killed_run_resumes_to_the_same_result(engine, tmp_path):
    """SIGKILL a run in the middle of round 1's generation, resume it, and compare with an uninterrupted run."""
    overrides = ["rounds=1", "stages.generate.chunking.size=2"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "selfimprove.cli", "run", str(TINY_STAR), *overrides,
                             "--run-dir", str(killed)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    shard = killed / "round_001" / "generate" / "shards" / "00001"
    deadline = time.time() + 300
    while not shard.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert shard.exists(), proc.stderr.read()[-3000:]
    assert not (killed / "round_001" / "generate" / "manifest.json").exists(), "killed too late to test resume"
    shards_before = sorted(p.name for p in shard.parent.iterdir() if not p.name.startswith("."))

    Runner(load_pipeline(TINY_STAR, overrides), killed, engine=engine, log=quiet).run()
    reference = tmp_path / "reference"
    Runner(load_pipeline(TINY_STAR, overrides), reference, engine=engine, log=quiet).run()

    def samples(run):
        rows = load_rows(run / "round_001" / "generate" / "data")
        return [(r["sample_id"], r["completion"], r["seed"]) for r in rows]

    assert len(shards_before) >= 2 and len(samples(killed)) == 16 * 2
    assert samples(killed) == samples(reference)
    for stage in ("evaluate",):
        got = read_json(killed / "round_001" / stage / "manifest.json")["metrics"]
        want = read_json(reference / "round_001" / stage / "manifest.json")["metrics"]
        assert got == want
    assert load_rows(killed / "round_001" / "filter" / "data") == load_rows(reference / "round_001" / "filter" / "data")


def test_a_damaged_artifact_is_redone_not_trusted(star_run, engine, tmp_path):
    """Truncate a finished stage's data: the rerun finds the checksum mismatch and redoes that stage and every stage
    after it, to the same result."""
    import shutil

    run_dir, _ = star_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    want = read_json(copy / "round_002" / "evaluate" / "manifest.json")["metrics"]
    data = next((copy / "round_002" / "evaluate" / "data").glob("*.arrow"))
    data.write_bytes(data.read_bytes()[:100])
    logs = []
    Runner(load_pipeline(TINY_STAR), copy, engine=engine, log=logs.append).run()
    assert any("do not match their checksums" in str(line) for line in logs)
    assert sum("done, skipped" in str(line) for line in logs) == 1 + 2 * len(STAGES) - 1
    assert read_json(copy / "round_002" / "evaluate" / "manifest.json")["metrics"] == want


def test_an_empty_selection_stops_with_the_reason_or_skips_training(engine, tmp_path):
    """The real `answer` critic (the pipeline's default, which tiny_star replaces with plugins) judges the random
    model's samples: it finds no right answer, so every problem is rationalized and nothing is kept."""
    from selfimprove.pipeline import StageFailed

    overrides = ["rounds=1", "evaluate_base=false", "stages.critique.critics=[{name: answer}]",
                 "stages.critique_rationalize.critics=[{name: answer}]"]
    with pytest.raises(StageFailed, match=r"round 1, stage train \(train\) failed: NothingToTrain: stage train \(round 1\): "
                                          r"stage 'filter' produced no training rows.*'examples': 0.*on_empty=skip"):
        Runner(load_pipeline(TINY_STAR, overrides), tmp_path / "stop", engine=engine, log=quiet).run()
    r1 = tmp_path / "stop" / "round_001"
    assert not (r1 / "train" / "manifest.json").exists()
    verdicts = load_rows(r1 / "critique" / "data")
    assert len(verdicts) == 32 and {v["critic"] for v in verdicts} == {"answer"}
    assert not any(v["label"] for v in verdicts) and all("extracted" in v["rationale"] for v in verdicts)
    assert read_json(r1 / "critique" / "manifest.json")["metrics"]["gold_accuracy"] == 0.0  # the task's grader agrees
    problems = {s["problem_id"] for s in load_rows(r1 / "generate" / "data")}
    assert {s["problem_id"] for s in load_rows(r1 / "rationalize" / "data")} == problems and len(problems) == 16
    Runner(load_pipeline(TINY_STAR, [*overrides, "stages.train.on_empty=skip"]), tmp_path / "skip", engine=engine,
           log=quiet).run()
    weights = read_json(tmp_path / "skip" / "round_001" / "train" / "weights.json")
    assert weights["trained"] is False and weights["adapter"] is None
    assert read_json(tmp_path / "skip" / "round_001" / "evaluate" / "manifest.json")["metrics"]["weights"] == "base"


def test_the_engine_is_stopped_while_a_stage_trains_and_started_again_after(tmp_path):
    """An engine that allows it is closed before the train stage (its memory goes to training) and a fresh one
    serves the next stage that generates; rerunning the finished run starts none."""
    from tests.plugins import ReleasableHFEngine

    ReleasableHFEngine.events.clear()
    lines = []
    pipeline = load_pipeline(TINY_STAR, ["rounds=1", "evaluate_base=false", "engine={name: 'tests.plugins:ReleasableHFEngine'}",
                                         "stages.generate.problems.num_problems=4", "stages.evaluate.problems.num_problems=2"])
    Runner(pipeline, tmp_path / "run", log=lines.append).run()
    # generate starts it, rationalize reuses it, train closes it, evaluate starts another
    assert ReleasableHFEngine.events == ["start", "close", "start", "close"]
    at = {key: next(i for i, line in enumerate(lines) if key in line)
          for key in ("train (train) ...", "train: engine stopped", "train_seconds=", "evaluate (evaluate) ...")}
    assert at["train (train) ..."] < at["train: engine stopped"] < at["train_seconds="] < at["evaluate (evaluate) ..."]
    assert sum("starting engine" in line for line in lines) == 2
    ev = read_json(tmp_path / "run" / "round_001" / "evaluate" / "manifest.json")["metrics"]
    assert ev["weights"] == "round_001/train"  # the fresh engine serves the trained adapter
