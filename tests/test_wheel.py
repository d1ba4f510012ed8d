"""selfimprove as an installed package: shipped files found by name; a built wheel runs outside the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from selfimprove.cli import main
from selfimprove.pipeline import load_pipeline
from selfimprove.shipped import find, root

REPO = Path(__file__).resolve().parents[1]
SHIPPED_DATA = ("pipelines", "configs", "seeds")


def test_a_name_finds_the_file_where_given_first_then_the_shipped_one(tmp_path):
    star = root() / "pipelines" / "star_arithmetic.yaml"
    assert find("star_arithmetic", tmp_path) == star  # a bare name is a shipped pipeline
    assert find("pipelines/star_arithmetic.yaml", tmp_path) == star  # a relative path, in the package's layout
    assert find("configs/accelerate/ddp.yaml", tmp_path) == root() / "configs" / "accelerate" / "ddp.yaml"
    own = tmp_path / "pipelines" / "star_arithmetic.yaml"
    own.parent.mkdir()
    own.write_text("name: mine\n")
    assert find("pipelines/star_arithmetic.yaml", tmp_path) == own  # a file where it is given wins
    (tmp_path / "star_arithmetic").mkdir()  # a run directory named like the pipeline does not hide it
    assert find("star_arithmetic", tmp_path) == star
    # what names no file comes back as given, for the caller's error; `..` and absolute paths never fall back
    assert find("pipelines/no_such.yaml", tmp_path) == tmp_path / "pipelines" / "no_such.yaml"
    assert find("../pipelines/star_arithmetic.yaml", tmp_path / "x") == tmp_path / "x" / ".." / "pipelines" / \
        "star_arithmetic.yaml"
    assert find("/nowhere/star_arithmetic", tmp_path) == Path("/nowhere/star_arithmetic")
    assert find("star_arithmetic.yaml", tmp_path) == tmp_path / "star_arithmetic.yaml"  # a name has no suffix


def test_a_pipeline_in_your_own_folder_includes_a_shipped_one(tmp_path):
    (tmp_path / "mine.yaml").write_text("include: tiny_spin\nname: my-spin\nrounds: 1\n")
    pipeline = load_pipeline(tmp_path / "mine.yaml")
    assert (pipeline.config.name, pipeline.config.rounds, pipeline.config.model) == ("my-spin", 1, "tiny-random-llama")
    assert "pairs" in pipeline.config.stages  # from spin_arithmetic.yaml, which tiny_spin includes in the package


def test_run_names_the_shipped_pipelines_when_nothing_matches(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tiny_spn", "--check"]) == 2
    err = capsys.readouterr().err
    assert "tiny_spn: no such config file here, nor among the shipped files" in err and "tiny_spin" in err


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from a copy of the sources (the build writes build/ and *.egg-info beside them), installed
    into its own folder with no dependencies: they come from this environment, selfimprove from the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "selfimprove", src / "selfimprove", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                    str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("selfimprove-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    away = tmp / "elsewhere"  # the working directory: no checkout, no pipelines/ or configs/ folder
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(tmp / "site")}
    return wheel, tmp / "site", away, env


def test_the_wheel_ships_every_data_file_of_the_package(installed):
    wheel = installed[0]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    data = {p.relative_to(REPO).as_posix() for kind in SHIPPED_DATA for p in (REPO / "selfimprove" / kind).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    assert {"selfimprove/pipelines/tiny_spin.yaml", "selfimprove/configs/models/tiny-random-llama.yaml",
            "selfimprove/seeds/gsm8k/test.jsonl"} <= data
    assert data - names == set()


def test_the_installed_wheel_runs_outside_the_checkout(installed):
    _, site, away, env = installed

    def run(*args):
        proc = subprocess.run(args, cwd=away, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    probe = ("import json, selfimprove\n"
             "from selfimprove.models import load_spec\n"
             "from selfimprove.tasks.gsm8k import GSM8K\n"
             "print(json.dumps({'file': selfimprove.__file__, 'model': load_spec('tiny-random-llama').source,\n"
             "                  'gsm8k_test': len(GSM8K(GSM8K.Config()).problems('test'))}))")
    found = json.loads(run(sys.executable, "-c", probe))
    assert Path(found["file"]).is_relative_to(site), found  # not the checkout, not an editable install
    assert found["model"] == "random" and found["gsm8k_test"] == 1319  # shipped model description, seed data
    cli = str(site / "bin" / "selfimprove")  # the console script the wheel installs
    assert "tiny_spin: ok (4 stages x 2 rounds)" in run(cli, "run", "tiny_spin", "--check")
    assert "ok (5 stages x 2 rounds)" in run(cli, "run", "pipelines/dpo_gsm8k.yaml", "--check")  # includes a trainer
    assert "tiny_self_rewarding" in run(cli, "list")
