"""Answer extraction and grading: the only place answers are parsed."""

import pytest

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
    train, test = task.problems("train"), task.problems("test")
    assert (len(train), len(test)) == (7473, 1319)
    first = train[0]
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


def test_arithmetic_is_deterministic_disjoint_and_graded():
    cfg = Arithmetic.Config(digits=[1, 2, 3], num_train=300, num_test=30)
    a, b = Arithmetic(cfg), Arithmetic(cfg)
    assert a.problems("train") == b.problems("train")
    train = {p["question"] for p in a.problems("train")}
    test = {p["question"] for p in a.problems("test")}
    shots = {p["question"] for p in a.problems("shots")}
    assert not (train & test) and not (train & shots) and not (test & shots)
    assert sorted({p["digits"] for p in a.problems("test")}) == [1, 2, 3]
    for p in a.problems("test"):
        x, y = map(int, p["question"].split(" + "))
        assert int(p["answer"]) == x + y and len(str(max(x, y))) <= p["digits"]
        assert a.grade(p, p["solution"]).strict
    other = Arithmetic(Arithmetic.Config(digits=[1, 2, 3], num_train=300, num_test=30, seed=7))
    assert other.problems("test") != a.problems("test")


def test_scratchpad():
    assert scratchpad(47, 85) == (
        "7 + 5 = 12, write 2, carry 1.\n4 + 8 + 1 = 13, write 3, carry 1.\n"
        "The carry 1 is the leading digit.\nThe answer is 132."
    )


def test_arithmetic_capacity_errors():
    with pytest.raises(ValueError, match="only 100 distinct problems"):
        Arithmetic(Arithmetic.Config(digits=[1], num_test=101)).problems("test")
