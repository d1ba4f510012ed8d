"""Defaults live in code, once: a shipped YAML (pipelines, component files, benchmark pipelines) states only what
differs. For every parameter a file sets, the file is loaded again without it; if the resolved config does not
change, the file restates a default (or a value it already inherits) and this test names it. The files are read
from a copy in a temporary folder (the variants are written beside them there, so includes resolve as they do
for the originals), never written into the source tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from selfimprove.config import ConfigError, to_dict
from selfimprove.pipeline import load_pipeline
from selfimprove.registry import EngineSpec, TrainerSpec
from selfimprove.shipped import root
from selfimprove.yamlio import load_yaml

REPO = Path(__file__).resolve().parents[1]
PIPELINES = sorted([*root().glob("pipelines/*.yaml"), *REPO.glob("benchmarks/*.yaml")])
COMPONENTS = {**{p: TrainerSpec for p in root().glob("configs/trainers/*.yaml")},
              **{p: EngineSpec for p in root().glob("configs/engines/*.yaml")}}
# Naming a component (or a stage's type, a file to include) is not restating a parameter's default; how an RL
# pipeline aggregates its token losses is stated by every shipped one on purpose, default or not (test_rl_loss.py).
NOT_PARAMETERS = {"name", "type", "include", "description", "loss_agg_mode"}


def key_paths(node: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a mapping, mappings descended into (a list is one value)."""
    out = []
    for key, value in node.items():
        path = (*prefix, key)
        if key not in NOT_PARAMETERS:
            out.append(path)
        if isinstance(value, dict):
            out += key_paths(value, path)
    return out


def without(node: dict, path: tuple) -> dict:
    out = dict(node)
    if len(path) == 1:
        del out[path[0]]
    else:
        out[path[0]] = without(out[path[0]], path[1:])
    return out


def resolved(path: Path, raw: dict, component=None) -> dict | None:
    """The resolved config of `raw` read as if it were the file at `path` (includes relative to it); None when it
    does not load without the key (a required key is not a restated default)."""
    tmp = path.parent / f".{path.stem}.variant.yaml"
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        if component is not None:
            return to_dict(component.from_config(load_yaml(tmp), str(path), "component"))
        return to_dict(load_pipeline(tmp).config)
    except ConfigError:
        return None
    finally:
        tmp.unlink()


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> Path:
    """The shipped pipelines and component files, and the benchmark pipelines, in their own layout in a temporary
    folder (pipelines/, configs/, benchmarks/), so that relative includes between them resolve."""
    folder = tmp_path_factory.mktemp("shipped")
    for name in ("pipelines", "configs"):
        shutil.copytree(root() / name, folder / name)
    (folder / "benchmarks").mkdir()
    for path in REPO.glob("benchmarks/*.yaml"):
        shutil.copy(path, folder / "benchmarks" / path.name)
    return folder


def _copy_of(path: Path, copies: Path) -> Path:
    return copies / path.relative_to(REPO if path.is_relative_to(REPO / "benchmarks") else root())


@pytest.mark.parametrize("path", [*PIPELINES, *COMPONENTS], ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_yaml_states_only_what_differs(path, copies):
    raw = yaml.safe_load(path.read_text())
    component = COMPONENTS.get(path)
    copy = _copy_of(path, copies)
    full = resolved(copy, raw, component)
    restated = [".".join(map(str, key)) for key in key_paths(raw)
                if resolved(copy, without(raw, key), component) == full]
    assert not restated, f"{path.relative_to(REPO)} restates defaults (delete them): {', '.join(restated)}"


def test_the_check_catches_a_restated_default(tmp_path):
    """The test above can fail: a pipeline restating `seed: 0` and the generate stage's default split is caught."""
    path = tmp_path / "p.yaml"
    raw = {"name": "p", "seed": 0, "model": "tiny-random-llama", "task": {"name": "arithmetic"},
           "stages": {"generate": {"problems": {"split": "train", "num_problems": 4}}}}
    full = resolved(path, raw)
    restated = [key for key in key_paths(raw) if resolved(path, without(raw, key)) == full]
    assert restated == [("seed",), ("stages", "generate", "problems", "split")]
