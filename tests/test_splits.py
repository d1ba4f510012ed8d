"""Train, dev and test never share a problem: checked on every registered task with its shipped data, under the
task's own equivalence and under exact (whitespace-normalised) text, with the equivalences re-derived here."""

import itertools
import json
import logging
import re

import pytest

from selfimprove.config import ConfigError, build
from selfimprove.registry import TASKS
from selfimprove.tasks.arithmetic import Arithmetic
from selfimprove.tasks.dataset import DatasetTask
from selfimprove.tasks.overlap import carve


def _text(problem: dict) -> str:
    return " ".join(problem["question"].split())


def _operands(problem: dict) -> tuple[int, int]:
    """`a + b` as an unordered pair: `3 + 8` and `8 + 3` are one problem."""
    a, b = problem["question"].split(" + ")
    return tuple(sorted((int(a), int(b))))


def _write_jsonl(path, questions):
    path.write_text("".join(json.dumps({"question": q, "answer": str(i)}) + "\n" for i, q in enumerate(questions)))
    return str(path)


def _shipped_task(name: str, tmp_path):
    """Each registered task as a run gets it: defaults, and for `dataset` files with planted duplicates."""
    if name == "dataset":
        test = _write_jsonl(tmp_path / "test.jsonl", ["What is 1 + 1?", "Name a prime.", "Spell cat."])
        dev = _write_jsonl(tmp_path / "dev.jsonl", ["Name  a prime.", "What is 2 + 2?"])
        train = _write_jsonl(tmp_path / "train.jsonl", ["What is 1 +  1?", "What is 2 + 2?", "What is 3 + 3?",
                                                        "Spell dog."])
        config = build(DatasetTask.Config, {"train": {"path": train}, "dev": {"path": dev}, "test": {"path": test}},
                       "pipe.yaml", "task")
        return DatasetTask(config)
    cls = TASKS.get(name)
    return cls(cls.Config())


@pytest.mark.parametrize("name", TASKS.names())
def test_every_registered_task_has_a_dev_split_disjoint_from_train_and_test(name, tmp_path):
    task = _shipped_task(name, tmp_path)
    assert {"train", "dev", "test"} <= set(task.available_splits(task.config))
    splits = {split: task.problems(split) for split in task.available_splits(task.config)}
    assert all(splits.values())
    for (a, pa), (b, pb) in itertools.combinations(splits.items(), 2):
        for key in (_text, task.canonical):
            both = {key(p) for p in pa} & {key(p) for p in pb}
            assert not both, f"{name}: {len(both)} problems in both {a} and {b}, e.g. {sorted(both)[:3]}"
        assert not {p["problem_id"] for p in pa} & {p["problem_id"] for p in pb}
    if name == "arithmetic":  # commutation, re-derived here rather than trusted to the task
        for (a, pa), (b, pb) in itertools.combinations(splits.items(), 2):
            assert not {_operands(p) for p in pa} & {_operands(p) for p in pb}, f"commuted sums in {a} and {b}"


def test_the_shipped_tasks_are_the_ones_checked():
    """A new registered task is checked by the test above; this guards that the registry is where it looks."""
    assert {"arithmetic", "dataset", "gsm8k", "math", "math500"} <= set(TASKS.names())


def test_no_test_sum_has_its_commuted_twin_in_train():
    """Issue 20's reproduction, unchanged: 39 of the 150 default test sums had their twin in train."""
    task = Arithmetic(Arithmetic.Config())
    train = {tuple(p["question"].split(" + ")) for p in task.problems("train")}
    leaked = [p["question"] for p in task.problems("test") if tuple(reversed(p["question"].split(" + "))) in train]
    assert leaked == []


@pytest.mark.parametrize("digits, sizes", [
    ([2, 3], {}),
    ([1, 2, 3], {"num_test": 60, "num_dev": 30, "num_train": 72}),  # 1 digit: 20 + 10 + 1 + 24 = 55
    ([1], {"num_test": 20, "num_dev": 20, "num_train": 12}),  # the whole one-digit pool: 20 + 20 + 3 + 12 = 55
])
def test_arithmetic_splits_share_no_commuted_sum(digits, sizes):
    """The leak of issue 20: `3 + 8` in test while `8 + 3` was in train (39 of 150 test problems)."""
    task = Arithmetic(Arithmetic.Config(digits=digits, **sizes))
    splits = {split: task.problems(split) for split in Arithmetic.splits}
    for split, problems in splits.items():
        size = getattr(task.config, f"num_{split}")
        assert len(problems) == size, f"{split}: {len(problems)} problems, asked for {size}"
        assert len({_operands(p) for p in problems}) == size, f"{split} repeats a sum"
    for (a, pa), (b, pb) in itertools.combinations(splits.items(), 2):
        assert not {_operands(p) for p in pa} & {_operands(p) for p in pb}, f"{a} and {b} share a sum"
    # both orders are shown: the generator does not always put the smaller operand first
    questions = [tuple(map(int, p["question"].split(" + "))) for p in splits["train"]]
    assert any(a < b for a, b in questions) and any(a > b for a, b in questions)


def test_arithmetic_split_sizes_that_do_not_fit_name_the_field_and_the_largest_that_fits():
    # one digit: 55 unordered sums. 20 test + 20 dev + 3 shots leave 12 for train
    Arithmetic.Config(digits=[1], num_test=20, num_dev=20, num_train=12)
    with pytest.raises(ValueError, match=re.escape("num_train: 13 does not fit: digits [1] give 55 1-digit distinct "
                                                   "sums")) as err:
        Arithmetic.Config(digits=[1], num_test=20, num_dev=20, num_train=13)
    assert "lower num_train to at most 12" in str(err.value)
    # [1, 2, 3] with the default 150 test problems: 50 one-digit test sums leave 5 of the 55, so dev gets 15 at most
    with pytest.raises(ValueError, match=r"num_dev: 150 does not fit.*lower num_dev to at most 15\b"):
        Arithmetic.Config(digits=[1, 2, 3])
    Arithmetic.Config(digits=[1, 2, 3], num_dev=15, num_shots=0, num_train=0)
    # the most that fits is exact: it loads, one more does not (shares are uneven when the size is not a multiple)
    with pytest.raises(ValueError, match=r"lower num_train to at most (\d+)") as err:
        Arithmetic.Config(digits=[1, 2], num_test=30, num_dev=30, num_shots=3, num_train=10_000)
    most = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    # 1 digit: 55 - 15 - 15 - 2 = 23 left; 2 digits: 4095 - 15 - 15 - 1 = 4064 left; equal shares: 2 x 23 = 46
    assert most == 46
    Arithmetic.Config(digits=[1, 2], num_test=30, num_dev=30, num_shots=3, num_train=most)
    with pytest.raises(ValueError):
        Arithmetic.Config(digits=[1, 2], num_test=30, num_dev=30, num_shots=3, num_train=most + 1)


def test_a_stage_can_draw_its_problems_from_dev(tmp_path):
    from selfimprove.pipeline import load_pipeline

    data = {"name": "t", "model": "tiny-random-llama", "task": {"name": "arithmetic"},
            "stages": {"evaluate": {"type": "evaluate", "problems": {"split": "dev"}}}}
    load_pipeline(None, data=data)
    data["task"] = {"name": "dataset", "test": {"path": _write_jsonl(tmp_path / "test.jsonl", ["q"])}}
    with pytest.raises(ConfigError, match=r"problems.split: 'dev'; task 'dataset' has splits test$"):
        load_pipeline(None, data=data)


def test_dataset_drops_duplicates_from_dev_and_train_and_logs_the_counts(tmp_path, caplog):
    task = _shipped_task("dataset", tmp_path)
    with caplog.at_level(logging.WARNING, logger="selfimprove.tasks.overlap"):
        train = task.problems("train")
    assert [p["question"] for p in task.problems("test")] == ["What is 1 + 1?", "Name a prime.", "Spell cat."]
    assert [p["question"] for p in task.problems("dev")] == ["What is 2 + 2?"]  # "Name  a prime." is in test
    assert [p["question"] for p in train] == ["What is 3 + 3?", "Spell dog."]
    messages = [r.getMessage() for r in caplog.records]
    assert "task dataset dev: dropped 1 of 2 problems that duplicate a test problem" in messages[0]
    assert any("task dataset train: dropped 1 of 4 problems that duplicate a test problem" in m for m in messages)
    assert any("task dataset train: dropped 1 of 4 problems that duplicate a dev problem" in m for m in messages)
    task.problems("train")
    assert len(caplog.records) == len(messages)  # logged once per task, not on every call


def test_dataset_dev_fraction_carves_a_seeded_slice_of_train(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [f"q{i}" for i in range(20)])

    def task(**params):
        return DatasetTask(build(DatasetTask.Config, {"train": {"path": train}, **params}, "pipe.yaml", "task"))

    assert DatasetTask.available_splits(task().config) == ("train",)
    a, b = task(dev_fraction=0.25), task(dev_fraction=0.25)
    assert DatasetTask.available_splits(a.config) == ("train", "dev")
    assert len(a.problems("dev")) == 5 and len(a.problems("train")) == 15
    assert a.problems("dev") == b.problems("dev")
    assert a.problems("dev") != task(dev_fraction=0.25, dev_seed=1).problems("dev")
    with pytest.raises(ConfigError, match=r"dev_fraction: 1.0 must be in \[0, 1\)"):
        task(dev_fraction=1.0)
    with pytest.raises(ConfigError, match="dev_fraction: give either a dev file"):
        task(dev_fraction=0.5, dev={"path": train})


def test_carve_is_a_seeded_slice_that_keeps_order():
    problems = [{"i": i} for i in range(10)]
    rest, held = carve(problems, 3, seed=0, canonical=str, what="x")
    assert len(held) == 3 and sorted(p["i"] for p in rest + held) == list(range(10))
    assert [p["i"] for p in held] == sorted(p["i"] for p in held)
    assert carve(problems, 3, seed=0, canonical=str, what="x") == (rest, held)
    with pytest.raises(ValueError, match="x: a dev slice of 11 problems does not fit in 10; lower num_dev"):
        carve(problems, 11, seed=0, canonical=str, what="x")
    # a split that repeats itself (MATH's train does): the copy left behind is not kept beside its held-out twin
    twins = [{"question": "same"}, {"question": " same "}]
    assert carve(twins, 1, seed=0, canonical=_text, what="x") == ([], [twins[0]]) or \
        carve(twins, 1, seed=0, canonical=_text, what="x") == ([], [twins[1]])
