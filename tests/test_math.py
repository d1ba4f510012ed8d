"""MATH: data, prompts, Math-Verify grading with its time limit, and the evaluate stage's breakdowns."""

import time

import pytest

from selfimprove.stages.common import Bootstrap
from selfimprove.stages.evaluate import Evaluate, score
from selfimprove.tasks.math import MATH, MATH500, last_boxed
from selfimprove.timeouts import TimedOut, call_with_timeout


@pytest.fixture(scope="module")
def math500():
    return MATH500(MATH500.Config(grading_timeout=1.0))


def test_data_splits_and_columns(math500):
    full = MATH(MATH.Config())
    test, train, dev = math500.problems("test"), math500.problems("train"), math500.problems("dev")
    full_test, full_train, full_dev = full.problems("test"), full.problems("train"), full.problems("dev")
    assert (len(test), len(train) + len(dev), len(full_test)) == (500, 12000, 5000)
    # train_reconstructed holds the 4,500 full-test problems outside MATH500 (and one MATH train problem repeats
    # a test problem's text): `math` must train on none of them. Of the 7,499 left, 500 are dev, and one more
    # train problem repeats the text of a dev one (tests/test_splits.py checks every split pair).
    full_questions = {p["question"].strip() for p in full_test}
    assert (len(full_train), len(full_dev)) == (6998, 500)
    assert not full_questions & {p["question"].strip() for p in full_train + full_dev}
    assert not {p["question"] for p in test} & {p["question"] for p in train}
    first = test[0]
    assert first["problem_id"] == "math-test/precalculus/807"
    assert (first["subject"], first["level"]) == ("Precalculus", 2)
    assert first["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert len({p["problem_id"] for p in full_test}) == 5000
    assert {p["subject"] for p in test} == {"Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra",
                                            "Number Theory", "Prealgebra", "Precalculus"}
    assert {p["level"] for p in test} == {1, 2, 3, 4, 5}
    assert MATH500.breakdown == ("subject", "level")


def test_every_gold_solution_grades_correct(math500):
    """The reference solutions (answer in the last \\boxed{}) must pass strict grading: a grader bug shows here."""
    wrong = [p["problem_id"] for p in math500.problems("test") if not math500.grade(p, p["solution"]).strict]
    assert wrong == []


@pytest.mark.parametrize("text, content", [
    ("so $\\boxed{5}$.", "5"),
    ("\\boxed{1} then \\boxed{\\frac{2}{3}}", "\\frac{2}{3}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{\\frac{1}{2}", None),  # unbalanced: no answer
    ("\\fbox{7}", "7"),
    ("\\boxed 5$", "5"),
    ("no box here", None),
    ("", None),
])
def test_last_boxed(text, content):
    assert last_boxed(text) == content


PROBLEM = {"answer": "\\frac{1}{2}", "question": "q"}


@pytest.mark.parametrize("completion, strict, flexible", [
    ("The answer is $\\boxed{\\frac{1}{2}}$.", True, True),
    ("\\boxed{\\dfrac12}", True, True),
    ("\\boxed{0.5}", True, True),
    ("\\boxed{\\left(\\frac{1}{2}\\right)}", True, True),
    ("First \\boxed{\\frac{1}{2}}, no wait, \\boxed{3}.", False, False),  # the last box is the answer
    ("The final answer is $\\frac{1}{2}$.", False, True),  # right, but not boxed
    ("\\boxed{2}", False, False),
    ("\\boxed{\\frac{1}{2}", False, True),  # unclosed box: no strict answer; Math-Verify still reads the fraction
    ("", False, False),
    ("\\boxed{}", False, False),
    ("\\boxed{" + "9" * 300 + "}", False, False),  # huge number
])
def test_grading(math500, completion, strict, flexible):
    g = math500.grade(PROBLEM, completion)
    assert (g.strict, g.flexible) == (strict, flexible)


def test_grading_latex_edge_cases(math500):
    assert math500.grade({"answer": "(3,\\frac{\\pi}{2})"}, "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}").strict
    assert math500.grade({"answer": "\\text{(C)}"}, "\\boxed{\\text{(C)}}").strict
    assert math500.grade({"answer": "90^\\circ"}, "\\boxed{90}").strict
    assert math500.grade({"answer": "\\sqrt{2}"}, "\\boxed{\\sqrt 2}").strict
    assert not math500.grade({"answer": "\\sqrt{2}"}, "\\boxed{2}").strict
    # An empty gold answer (two train problems) can never be matched.
    assert not math500.grade({"answer": ""}, "\\boxed{}").strict
    # The answer a completion commits to, normalised so majority votes group equal answers.
    assert math500.grade(PROBLEM, "\\boxed{\\dfrac{1}{2}}").answer == "\\frac{1}{2}"
    assert math500.grade(PROBLEM, "I think 7").answer == "7"


def test_pathological_expression_cannot_stall_grading(math500):
    started = time.time()
    g = math500.grade({"answer": "5"}, "\\boxed{9^{9^{9^{9^{9}}}}}")
    assert not g.strict and not g.flexible
    assert time.time() - started < 8  # two comparisons, each cut at grading_timeout=1s (+ parsing)


def test_timeouts_nest():
    def spin(seconds):
        end = time.time() + seconds
        while time.time() < end:
            pass
        return "done"

    assert call_with_timeout(1.0, spin, 0.01) == "done"
    with pytest.raises(TimedOut):
        call_with_timeout(0.1, spin, 5)

    def inner_swallows():  # an inner limit that catches its own TimedOut must not hide the outer one
        try:
            call_with_timeout(10.0, spin, 5)
        except TimedOut:
            return "inner caught it"
        return "finished"

    started = time.time()
    with pytest.raises(TimedOut):
        call_with_timeout(0.2, inner_swallows)
    assert time.time() - started < 2

    def inner_expires():
        try:
            call_with_timeout(0.1, spin, 5)
        except TimedOut:
            return spin(0.05)

    assert call_with_timeout(5.0, inner_expires) == "done"  # the outer limit stays armed afterwards
    with pytest.raises(TimedOut):
        call_with_timeout(0.3, lambda: (inner_expires(), spin(5)))


def test_prompts(math500):
    p = math500.problems("test")[0]
    chat = math500.prompt(p)
    assert len(chat) == 1 and "\\boxed{}" in chat[0]["content"] and p["question"] in chat[0]["content"]
    hinted = math500.prompt(p, hint=True)[-1]["content"]
    assert f"The correct answer is ${p['answer']}$" in hinted
    few = MATH500(MATH500.Config(prompt_format="fewshot", num_shots=2)).prompt(p)
    assert [m["role"] for m in few] == ["user", "assistant", "user", "assistant", "user"]
    assert all(last_boxed(m["content"]) for m in few if m["role"] == "assistant")


def test_breakdown_by_subject_and_level():
    rows = [
        {"problem_id": f"p{i}", "index": 0, "correct": ok, "correct_flexible": ok, "extracted": None,
         "num_tokens": 5, "finish_reason": "stop", "subject": subject, "level": level}
        for i, (subject, level, ok) in enumerate([("Algebra", 1, True), ("Algebra", 2, False),
                                                  ("Geometry", 1, True), ("Geometry", 1, True)])
    ]
    config = Evaluate.Config(bootstrap=Bootstrap(resamples=50))
    out = score(rows, config, seed=0, breakdown=list(MATH500.breakdown))
    assert out["by/subject=Algebra/accuracy"] == 0.5 and out["by/subject=Geometry/accuracy"] == 1.0
    assert out["by/level=1/accuracy"] == 1.0 and out["by/level=2/problems"] == 1
    assert not any(k.startswith("by/") for k in score(rows, config, seed=0))  # config.breakdown is empty
