"""Answer extraction and grading: the only place answers are parsed."""

import re

import pytest

from selfimprove.config import ConfigError
from selfimprove.tasks.arithmetic import Arithmetic, scratchpad
from selfimprove.tasks.gsm8k import GSM8K, clean_solution
from selfimprove.tasks.numeric import extract_flexible, extract_strict, normalize_number


@pytest.mark.parametrize("text, strict, flexible", [
    ("So 3 + 4 = 7. The answer is 7.", "7", "7"),
    ("The answer is 1,080.", "1080", "1080"),
    ("The answer is $1,234.50", "1234.5", "1234.5"),
    ("The answer is -12.", "-12", "-12"),
    ("The answer is: 12.00", "12", "12"),
    ("The final answer is **42**", "42", "42"),
    ("#### 72", "72", "72"),
    ("The answer is 5. Wait, no. The answer is 6.", "6", "6"),
    ("I think it is 12 apples, then 13.", None, "13"),
    ("The answer is N.", None, None),
    ("", None, None),
    ("The answer is 123456789012345678901234567890.", "123456789012345678901234567890",
     "123456789012345678901234567890"),
    ("The answer is .5", "0.5", "0.5"),
])
def test_numeric_extraction(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_strict_pick_first_matches_the_harness():
    text = "The answer is 5. Wait, no. The answer is 6."
    assert extract_strict(text, "first") == "5"
    task = GSM8K(GSM8K.Config(strict_pick="first"))
    p = next(x for x in task.problems("test") if x["answer"] == "5")
    assert task.grade(p, text).strict and not GSM8K(GSM8K.Config()).grade(p, text).strict


def test_normalize_number():
    assert normalize_number("1,000,000") == "1000000"
    assert normalize_number("3.140") == "3.14"
    assert normalize_number("abc") is None
    assert normalize_number("nan") is None


def test_gsm8k_data_and_grading():
    task = GSM8K(GSM8K.Config())
    train, dev, test = task.problems("train"), task.problems("dev"), task.problems("test")
    assert (len(train), len(dev), len(test)) == (7473 - 500, 500, 1319)  # dev: a seeded slice of GSM8K's train
    first = min(train + dev, key=lambda p: p["problem_id"])  # ids keep GSM8K's own train order
    assert first["answer"] == "72" and first["problem_id"] == "gsm8k-train-00000"
    assert "<<" not in first["solution"] and first["solution"].endswith("The answer is 72.")
    assert task.grade(first, first["solution"]).strict
    assert not task.grade(first, "The answer is 71.").strict
    g = task.grade(first, "They sold 72 clips")
    assert (g.strict, g.flexible) == (False, True)
    # thousands commas in the gold answer are normalised away
    comma = next(p for p in train if p["answer"] == "1080")
    assert task.grade(comma, "The answer is 1,080.").strict


def test_gsm8k_prompts():
    task = GSM8K(GSM8K.Config(prompt_format="fewshot", num_shots=2))
    p = task.problems("test")[0]
    messages = task.prompt(p)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert p["question"] in messages[-1]["content"] and p["answer"] not in messages[-1]["content"].split("\n\n")[0]
    hinted = task.prompt(p, hint=True)
    assert f"The correct answer is {p['answer']}" in hinted[-1]["content"]
    assert clean_solution("a <<1+1=2>>2\n#### 2") == "a 2\nThe answer is 2."


def test_arithmetic_is_deterministic_and_graded():
    cfg = Arithmetic.Config(digits=[1, 2, 3], num_train=30, num_test=30, num_dev=15)
    a, b = Arithmetic(cfg), Arithmetic(cfg)
    assert a.problems("train") == b.problems("train")  # disjointness: tests/test_splits.py
    assert sorted({p["digits"] for p in a.problems("test")}) == [1, 2, 3]
    for p in a.problems("test"):
        x, y = map(int, p["question"].split(" + "))
        assert int(p["answer"]) == x + y and len(str(max(x, y))) <= p["digits"]
        assert a.grade(p, p["solution"]).strict
    assert a.canonical({"question": "8 + 3"}) == a.canonical({"question": "3 + 8"}) == "3 + 8"
    other = Arithmetic(Arithmetic.Config(digits=[1, 2, 3], num_train=30, num_test=30, num_dev=15, seed=7))
    assert other.problems("test") != a.problems("test")


def test_scratchpad():
    assert scratchpad(47, 85) == (
        "7 + 5 = 12, write 2, carry 1.\n4 + 8 + 1 = 13, write 3, carry 1.\n"
        "The carry 1 is the leading digit.\nThe answer is 132."
    )


def test_arithmetic_capacity_errors():
    with pytest.raises(ValueError, match=r"num_test: 56 does not fit: digits \[1\] give 55 1-digit distinct sums"):
        Arithmetic.Config(digits=[1], num_train=0, num_dev=0, num_test=56)
    # the dev set and the few-shot exemplars come out of the same pool as the test set
    with pytest.raises(ValueError, match=r"num_shots: 3 does not fit.*after num_test=50, num_dev=3 at most "
                                         r"num_shots=2 is left"):
        Arithmetic.Config(digits=[1], num_train=0, num_test=50, num_dev=3)
    Arithmetic.Config(digits=[1], num_train=0, num_test=50, num_dev=2)


def test_arithmetic_digits_too_few_problems_fail_at_config_load():
    """`digits: [1]` with the default sizes (150 test, 6000 train) used to pass the config and fail mid-run."""
    from selfimprove.pipeline import load_pipeline

    data = {"name": "t", "model": "tiny-random-llama", "task": {"name": "arithmetic", "digits": [1]},
            "stages": {"evaluate": {"type": "evaluate"}}}
    with pytest.raises(ConfigError, match=r"<pipeline>: task: num_test: 150 does not fit: digits \[1\] give 55 "
                                          r"1-digit distinct sums"):
        load_pipeline(None, data=data)
    data["task"].update(num_test=20, num_dev=20)
    with pytest.raises(ConfigError, match=re.escape(
            "num_train: 6000 does not fit: digits [1] give 55 1-digit distinct sums up to the order of the operands, "
            "every split takes an equal share of each digit count, and after num_test=20, num_dev=20, num_shots=3 at "
            "most num_train=12 is left; lower num_train to at most 12, or add longer digit counts (e.g. digits: "
            "[1, 2])")):
        load_pipeline(None, data=data)
    data["task"]["num_train"] = 12
    load_pipeline(None, data=data)
    task = Arithmetic(Arithmetic.Config(digits=[1], num_train=12, num_test=20, num_dev=20))
    everything = [task.canonical(p) for split in Arithmetic.splits for p in task.problems(split)]
    assert len(everything) == len(set(everything)) == 55  # the whole pool, each sum once up to order


def test_a_users_task_class_loads_by_dotted_path():
    """A Task subclass in the user's own module goes through the same config checks as a built-in task."""
    from selfimprove.config import to_dict
    from selfimprove.pipeline import load_pipeline

    from .task_plugins import WordLength

    def pipeline(task: dict, split: str = "test") -> dict:
        return {"name": "plugin", "model": "tiny-random-llama",
                "task": {"name": "tests.task_plugins:WordLength", **task},
                "stages": {"evaluate": {"type": "evaluate", "problems": {"split": split}}}}

    loaded = load_pipeline(None, data=pipeline({"num_test": 3}))
    assert to_dict(loaded.config)["task"]["num_test"] == 3
    with pytest.raises(ConfigError, match=r"task.num_tests: unknown key; valid keys of WordLength.Config: "
                                          r"num_test, words"):
        load_pipeline(None, data=pipeline({"num_tests": 3}))
    with pytest.raises(ConfigError, match=r"<pipeline>: task: num_test must be in 1..4"):  # the plugin's own check
        load_pipeline(None, data=pipeline({"num_test": 5}))
    with pytest.raises(ConfigError, match=r"stages.evaluate.problems.split: 'validation'; task "
                                          r"'tests.task_plugins:WordLength' has splits train, test"):
        load_pipeline(None, data=pipeline({}, split="validation"))
    with pytest.raises(ConfigError, match=r"module 'tests.task_plugins' has no attribute 'WordCount'"):
        load_pipeline(None, data={**pipeline({}), "task": {"name": "tests.task_plugins:WordCount"}})
    task = WordLength(WordLength.Config(num_test=3))
    (problem,) = [p for p in task.problems("test") if p["question"] == "moon"]
    assert task.grade(problem, "m-o-o-n: The answer is 4.").strict
    assert not task.grade(problem, "The answer is 5.").strict
