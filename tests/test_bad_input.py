"""Hostile and mistaken pipeline files: `selfimprove run FILE --check` answers each with one `config error:` line
naming the file and what to do, exit code 2, no traceback, and quickly (no row may expand what it describes).

One table, one row per way a file can be wrong: the bytes (encoding, binary, size), the YAML (syntax, shape,
aliases that multiply, nesting, duplicate keys), `include:` (missing, circular, multiplying) and the config
itself (keys, types, values, names of components).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from selfimprove.cli import main

BASE = """\
name: t
model: tiny-random-llama
task: {name: arithmetic}
stages:
  generate: {sampling: {n: 2, temperature: 0.7}}
  critique: {samples: generate}
"""
DIR = object()  # a row's file that is a directory
ABSENT = None  # a row's file that does not exist

# "billion laughs": each anchor is a list of ten aliases of the previous one, 10**9 values once expanded.
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
# Ten files, each including the next ten times: 10**9 includes.
MULTIPLYING = {f"m{i}.yaml": "\n".join(f"k{j}: {{include: m{i + 1}.yaml}}" for j in range(10)) for i in range(9)}
MULTIPLYING["m9.yaml"] = "x: 1\n"
# 30 levels: within the limit alone, past it where the row includes it, three levels down.
DEEP_30 = "".join("  " * i + f"k{i}:\n" for i in range(29)) + "  " * 29 + "v: 1\n"

# id, files (text or bytes of the file run; or {path: content} with the file run first), a fragment of the
# error, and the file the error must name when it is not the one run.
ROWS = [
    # -- bytes ----------------------------------------------------------------------------------------------------
    ("latin-1", b"name: caf\xe9\nstages: {generate: {}}\n", "not valid UTF-8: byte 0xe9 at byte offset 9 (line 1); "
                                                           "re-save the file as UTF-8", None),
    ("latin-1-later-line", BASE.encode() + b"description: na\xefve\n",
     f"byte 0xef at byte offset {len(BASE) + 15} (line 7)", None),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "NUL byte at byte offset 8: this is a binary file",
     None),
    ("utf-16", BASE.encode("utf-16"), "UTF-16 encoded; re-save it as UTF-8", None),
    ("control-character", BASE + "description: bell\x07\n", "line 7: character 0x07 is not allowed", None),
    ("too-big", BASE + "# padding\n" * 110_000, "more than the 1048576 a config may have", None),
    ("missing", {"missing.yaml": ABSENT}, "no such config file", None),
    ("directory", {"dir.yaml": DIR}, "not a regular file", None),
    # -- YAML -----------------------------------------------------------------------------------------------------
    ("tab-indent", "name: t\nstages:\n\tgenerate: {}\n", "line 3, column 1: not valid YAML", None),
    ("unclosed-flow", "name: t\nstages: {generate: {sampling: {n: 2}\n", "not valid YAML: expected ',' or '}'", None),
    ("unclosed-quote", 'name: "t\nstages: {}\n', "not valid YAML: found unexpected end of stream", None),
    ("empty", "", "the file is empty", None),
    ("only-comments", "# name: t\n# stages: {}\n", "the file is empty", None),
    ("top-level-list", "- generate\n- train\n", "the top level must be a mapping (`key: value` lines), got a list",
     None),
    ("top-level-scalar", "star_arithmetic\n", "got the single value 'star_arithmetic'", None),
    ("two-documents", BASE + "---\nname: u\n", "a second document (`---`)", None),
    ("duplicate-key", BASE + "name: u\n", "line 7, column 1: duplicate key 'name' (first at line 1)", None),
    ("bad-date", BASE + "description: 2024-13-40\n", "cannot read the value '2024-13-40': month must be in 1..12",
     None),
    ("huge-integer", BASE + "seed: " + "9" * 5000 + "\n", "Exceeds the limit (4300 digits)", None),
    ("undefined-alias", BASE + "seed: *s\n", "found undefined alias 's'", None),
    ("python-tag", BASE + "seed: !!python/object/apply:os.system [ls]\n", "could not determine a constructor", None),
    ("non-string-keys", BASE + "1: 2\nnull: 3\n", "1: unknown key", None),
    ("billion-laughs", LAUGHS, "alias *d stands for 11111 values", None),
    ("alias-cycle", "name: t\nstages: &s {generate: *s}\n", "stages.generate: alias *s refers to a value that "
                                                            "contains it", None),
    ("deep-flow-nesting", "name: t\nstages: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested more than 32 levels deep", None),
    ("deep-nesting", "name: t\nstages: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep", None),
    ("deep-block-nesting", "".join("  " * i + f"k{i}:\n" for i in range(40)), "k0.k1.k2", None),
    ("too-many-values", "name: t\nstages:\n" + "".join(f"  - {i}\n" for i in range(30_000)),
     "more than 20000 keys and values", None),
    # -- include: -------------------------------------------------------------------------------------------------
    ("include-missing", {"p.yaml": BASE + "engine: {include: engines/nope.yaml}\n"},
     "engine.include: included file engines/nope.yaml does not exist", None),
    ("include-missing-nested", {"p.yaml": "include: base.yaml\n", "base.yaml": "include: gone.yaml\nname: t\n"},
     "p.yaml): include: included file gone.yaml does not exist", "base.yaml (included by "),
    ("include-self", {"p.yaml": "include: p.yaml\nname: t\n"}, "circular include", None),
    ("include-cycle", {"a.yaml": "include: b.yaml\n", "b.yaml": "engine: {include: a.yaml}\n"},
     "a.yaml): engine.include: circular include", "b.yaml (included by "),
    ("include-not-a-name", {"p.yaml": BASE + "engine: {include: [3]}\n"},
     "engine.include: expected a file name or a list of file names, got [3]", None),
    ("include-binary", {"p.yaml": "include: bin.yaml\n", "bin.yaml": b"\x00\x01"}, "binary file", "bin.yaml"),
    ("include-list", {"p.yaml": BASE + "engine: {include: e.yaml}\n", "e.yaml": "- vllm\n"},
     "the top level must be a mapping", "e.yaml"),
    ("include-lands-deep", {"p.yaml": "a: {b: {c: {include: d.yaml}}}\n", "d.yaml": DEEP_30},
     "k0.k1.k2", "d.yaml (included by "),
    ("include-multiplying", {"p.yaml": BASE + "engine: {include: m0.yaml}\n", **MULTIPLYING},
     "more than 64 files read for one config", None),
    # -- the config -----------------------------------------------------------------------------------------------
    ("unknown-top-level-key", BASE + "rouns: 2\n", "rouns: unknown key", None),
    ("unknown-stage-key", BASE + "  evaluate: {sampling: {temprature: 0.5}}\n",
     "stages.evaluate.sampling.temprature: unknown key", None),
    ("wrong-type", BASE + "rounds: three\n", "rounds: expected an integer, got 'three'", None),
    ("negative-rounds", BASE + "rounds: -1\n", "rounds must be >= 0", None),
    ("missing-name", BASE.replace("name: t\n", ""), "name: required key is missing", None),
    ("unknown-task", BASE.replace("arithmetic", "gsm9k"), "unknown task 'gsm9k'", None),
    ("unknown-stage-type", BASE.replace("critique: {samples", "critique: {type: critic, samples"),
     "unknown stage 'critic'", None),
    ("unknown-engine", BASE + "engine: {name: vlm}\n", "unknown engine 'vlm'", None),
    ("unknown-trainer", BASE + "  train: {data: critique, trainer: {name: sfft}}\n", "unknown trainer 'sfft'", None),
    ("unknown-model", BASE.replace("tiny-random-llama", "smollm3"), "unknown model 'smollm3'", None),
    ("critic-does-not-import", BASE.replace("critique: {samples: generate}",
                                            "critique: {samples: generate, critics: [{name: 'nopkg.x:C'}]}"),
     "cannot import module 'nopkg.x'", None),
    ("later-stage-reference", BASE.replace("samples: generate", "samples: train"), "refers to stage 'train'", None),
    ("missing-task", BASE.replace("task: {name: arithmetic}\n", ""), "task: required", None),
    ("too-few-problems", BASE.replace("{name: arithmetic}", "{name: arithmetic, digits: [1]}"),
     "num_test: 150 does not fit: digits [1] give 55 1-digit distinct sums", None),
    ("out-of-range-sampling", BASE.replace("temperature: 0.7", "temperature: -1"), "temperature must be >= 0", None),
    ("critic-wrong-signature", BASE.replace("critique: {samples: generate}", "critique: {samples: generate, "
                                            "critics: [{name: 'tests.plugins:no_samples_argument'}]}"),
     "cannot be called as no_samples_argument(samples)", None),
    ("critic-parameter-type", BASE.replace("critique: {samples: generate}", "critique: {samples: generate, "
                                           "critics: [{name: 'tests.plugins:accept_all', score: one}]}"),
     "critics[0].score: expected a number, got 'one'", None),
    ("class-critic-without-judge", BASE.replace("critique: {samples: generate}", "critique: {samples: generate, "
                                                "critics: [{name: 'tests.plugins:CallableCritic'}]}"),
     "must implement judge(self, samples", None),
    ("filter-unknown-critic-id", BASE + "  filter: {critic: anwser}\n",
     "critic 'anwser' is not run by stage 'critique'; its critic ids: answer", None),
    ("filter-ambiguous-critic", BASE.replace("critique: {samples: generate}", "critique: {samples: generate, "
                                             "critics: [{name: answer}, {name: majority}]}") + "  filter: {}\n",
     "runs critics answer, majority: set `critic:`", None),
    ("unknown-objective", BASE + "  rl: {objective: score_stage3}\n", "unknown objective 'score_stage3'", None),
    ("unknown-baseline", BASE + "  rl: {trainer: {baseline: ppo}}\n", "unknown baseline 'ppo'", None),
    ("rl-dropout", BASE + "  rl: {trainer: {lora: {dropout: 0.1}}}\n", "lora.dropout must be 0", None),
    ("offline-trainer-in-rl", BASE + "  rl: {trainer: {name: sft}}\n", "an rl stage needs an online one", None),
]


def _write(tmp_path: Path, row_id: str, files) -> Path:
    """Write the row's files; return the one to run."""
    if not isinstance(files, dict):
        files = {f"{row_id}.yaml": files}
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not ABSENT:
            path.write_text(content)
    return tmp_path / next(iter(files))


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """Import what `run --check` imports once, so the time limit below measures reading the file."""
    assert main(["list"]) == 0


@pytest.mark.parametrize("row_id, files, fragment, named", ROWS, ids=[row[0] for row in ROWS])
def test_bad_pipeline_file_is_refused_cleanly(row_id, files, fragment, named, tmp_path, capsys):
    path = _write(tmp_path, row_id, files)
    capsys.readouterr()
    started = time.monotonic()
    code = main(["run", str(path), "--check"])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("config error: ") and err.count("\n") == 1, err
    assert fragment in err
    assert (named or path.name) in err
    assert "Traceback" not in err
    assert seconds < 5, f"{row_id} took {seconds:.1f}s"


def test_table_covers_every_kind_of_input():
    """Guards the table against shrinking: at least one row per family."""
    ids = {row[0] for row in ROWS}
    assert {"latin-1", "binary", "billion-laughs", "deep-nesting", "include-cycle", "include-missing",
            "empty", "top-level-list", "too-big", "unknown-top-level-key", "critic-does-not-import"} <= ids
    assert len(ids) == len(ROWS)


@pytest.mark.parametrize("override, fragment", [
    ("rounds=[1, 2", "override 'rounds': line 1, column 6: not valid YAML: expected ',' or ']'"),
    ("description=" + LAUGHS.replace("\n", ", ").join("{}"), "alias *d stands for 11111 values"),
    ("description=" + "[" * 40 + "]" * 40, "nested more than 32 levels deep"),
], ids=["syntax", "billion-laughs", "deep-nesting"])
def test_bad_override_is_refused_cleanly(override, fragment, tmp_path, capsys):
    path = _write(tmp_path, "ok", BASE)
    assert main(["run", str(path), "--check"]) == 0
    capsys.readouterr()
    started = time.monotonic()
    assert main(["run", str(path), "--check", override]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "command line" in err and "Traceback" not in err, err
    assert time.monotonic() - started < 5


def test_model_mismatches_are_refused_before_any_model_loads(tiny_model, tmp_path, capsys):
    """Checked once the model folder exists, before an engine starts: an adapter trained for another base (its
    LoRA shapes do not fit), and chat prompts for a model without a chat template."""
    import shutil

    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "other-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "some/bigger-model", "r": 4}')
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 128)},
              str(adapter / "adapter_model.safetensors"))
    path = tmp_path / "p.yaml"
    path.write_text(BASE + f"adapter: {adapter}\nruns_dir: {tmp_path / 'runs'}\n")
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "adapter: adapter" in err and "was trained for another base model" in err and "128 inputs" in err
    assert "hidden size 64" in err and "some/bigger-model" in err and "Traceback" not in err

    no_template = tmp_path / "no-template-model"
    shutil.copytree(tiny_model, no_template)
    (no_template / "chat_template.jinja").unlink()
    path.write_text(BASE.replace("tiny-random-llama", str(no_template)) + f"runs_dir: {tmp_path / 'runs'}\n")
    assert main(["run", str(path), "name=t2"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template, but the task builds chat prompts" in err and "`chat_template`" in err
