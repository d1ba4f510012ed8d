"""The command line: config checks, errors, and `selfimprove eval` end to end on the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

from selfimprove.cli import main
from selfimprove.shipped import root

REPO = Path(__file__).resolve().parents[1]
PIPELINES = root() / "pipelines"


def test_run_check_and_config_error(capsys, tmp_path):
    assert main(["run", str(PIPELINES / "star_arithmetic.yaml"), "--check"]) == 0
    assert "ok (7 stages x 3 rounds)" in capsys.readouterr().out
    assert main(["run", str(PIPELINES / "star_arithmetic.yaml"), "stages.generate.samplng.n=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: command-line override 'stages.generate.samplng.n=3' (over ")
    assert "star_arithmetic.yaml): stages.generate.samplng: unknown key; valid keys of Generate.Config" in err


def test_errors_caused_by_an_override_name_the_override(capsys, tmp_path):
    """A bad value, an unknown key or an unknown component that an override wrote is the override's error; an
    error about a mapping an override changed names the override beside the file; the file's own errors do not."""
    pipeline = str(PIPELINES / "star_arithmetic.yaml")
    cases = [
        (["stages.generate.sampling.n=abc"],
         "command-line override 'stages.generate.sampling.n=abc' (over {}): stages.generate.sampling.n: expected "
         "an integer"),
        (["rounds=2", "model=nosuch"], "command-line override 'model=nosuch' (over {}): model: unknown model"),
        (["stages.generat.sampling.n=2"], "command-line override 'stages.generat.sampling.n=2' (over {}): "
                                          "stages.generat: unknown stage 'generat'"),
        (["task.name=nosuch"], "(with the command-line override 'task.name=nosuch')"),
        (["rounds=-1"], "{}: <top>: rounds must be >= 0 (with the command-line override 'rounds=-1')"),
    ]
    for overrides, message in cases:
        assert main(["run", pipeline, *overrides, "--check"]) == 2
        err = capsys.readouterr().err
        assert message.format(pipeline) in err, err
    # the file's own error stays the file's, whatever else the command line overrides
    own = tmp_path / "own.yaml"
    own.write_text(f"include: {pipeline}\nname: own\nstages:\n  generate: {{sampling: {{n: abc}}}}\n")
    assert main(["run", str(own), "rounds=2", "stages.train.trainer.optim.batch_size=4", "--check"]) == 2
    assert capsys.readouterr().err == (f"config error: {own}: stages.generate.sampling.n: expected an integer, "
                                       f"got 'abc'\n")


def test_help_prints_percent_signs_once():
    proc = subprocess.run([sys.executable, "-m", "selfimprove.cli", "eval", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert "95% bootstrap" in proc.stdout and "%%" not in proc.stdout


def test_list_names_components(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(":")[0].strip(): line.split(":", 1)[1] for line in out.splitlines()}
    assert {"arithmetic", "gsm8k"} <= {n.strip() for n in lines["tasks"].split(",")}
    assert "filter" in lines["stages"] and {"dpo", "sft"} <= {n.strip() for n in lines["trainers"].split(",")}


def test_eval_with_adapter_on_tiny_model(tiny_model, tiny_adapter, tmp_path):
    run_dir = tmp_path / "eval"
    cmd = [sys.executable, "-m", "selfimprove.cli", "eval", "--model", "tiny-random-llama", "--task", "arithmetic",
           "--adapter", tiny_adapter, "--num-problems", "6", "--k", "3", "--max-tokens", "8", "--run-dir",
           str(run_dir), "engine.in_process=true", "engine.max_model_len=1024", "task.num_test=12",
           "task.prompt_format=chat"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert line["weights"] == "initial adapter" and line["problems"] == 6 and line["samples"] == 18
    for key in ("accuracy", "accuracy_ci_low", "pass@1", "pass@3", "maj@3", "pass@3_ci_high"):
        assert key in line, key
    assert "accuracy [95% CI]" in proc.stdout  # the table is printed
