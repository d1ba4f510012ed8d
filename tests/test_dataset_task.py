"""The `dataset` task: a researcher's own files read by a column map, graded by a named grader, and bad data
refused when the config is built (before any model loads), with the field and the fix named."""

import csv
import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfimprove.config import ConfigError, build
from selfimprove.tasks.dataset import DatasetTask, question_id
from selfimprove.tasks.graders import Numeric

ROWS = [
    {"uid": "p1", "problem": "Tom has 2 apples and buys 3 more. How many apples?", "final": "5",
     "worked": "2 + 3 = 5.\nThe answer is 5.", "topic": "add"},
    {"uid": "p2", "problem": "A bike costs 1,000 and the tax is 80. What is the total?", "final": "#### 1,080",
     "worked": "1,000 + 80 = 1,080.\nThe answer is 1,080.", "topic": "add"},
    {"uid": "p3", "problem": "What is half of 25?", "final": 12.5,
     "worked": "25 / 2 = 12.5.\nThe answer is 12.5.", "topic": "div"},
]
COLUMNS = {"question": "problem", "answer": "final", "solution": "worked", "id": "uid"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def config(**params):
    """The task config exactly as a pipeline YAML's `task:` mapping builds it."""
    return build(DatasetTask.Config, params, "pipe.yaml", "task")


def task(**params) -> DatasetTask:
    return DatasetTask(config(**params))


@pytest.fixture
def jsonl(tmp_path):
    return write_jsonl(tmp_path / "test.jsonl", ROWS)


def test_problems_carry_ids_gold_answers_solutions_and_breakdown(jsonl):
    t = task(test={"path": str(jsonl)}, columns=COLUMNS, breakdown=["topic"])
    problems = t.problems("test")
    assert [p["problem_id"] for p in problems] == ["p1", "p2", "p3"]
    assert [p["answer"] for p in problems] == ["5", "1080", "12.5"]  # "#### 1,080" and 12.5 read as GSM8K's
    assert problems[0]["question"] == ROWS[0]["problem"] and problems[0]["topic"] == "add"
    assert t.breakdown == ("topic",)
    assert [t.reference_solution(p) for p in problems] == [r["worked"] for r in ROWS]
    assert all(t.grade(p, t.reference_solution(p)).strict for p in problems)  # gold solutions pass their grader
    bare = task(test={"path": str(jsonl)}, columns={"question": "problem", "answer": "final"})
    assert bare.reference_solution(bare.problems("test")[0]) is None


def test_prompt_is_instruction_answer_format_question_and_hint(jsonl):
    t = task(test={"path": str(jsonl)}, columns=COLUMNS, instruction="Think it through.")
    p = t.problems("test")[1]
    (message,) = t.prompt(p)
    assert message["role"] == "user"
    assert message["content"] == f"Think it through. {Numeric.answer_format}\n\n{p['question']}"
    (hinted,) = t.prompt(p, hint=True)
    assert hinted["content"].startswith(message["content"]) and "The correct answer is 1080." in hinted["content"]
    own = task(test={"path": str(jsonl)}, columns=COLUMNS, answer_format="Reply with the number only.",
               hint="(Psst: {answer}.)")
    assert own.prompt(p)[0]["content"].startswith(
        "Solve the following problem step by step. Reply with the number only.")
    assert own.prompt(p, hint=True)[0]["content"].endswith("(Psst: 1080.)")
    boxed = task(test={"path": str(jsonl)}, columns=COLUMNS, grader="math_verify")
    assert "\\boxed{}" in boxed.prompt(p)[0]["content"]


@pytest.mark.parametrize("index, completion, strict, flexible", [
    (0, "2 + 3 = 5.\nThe answer is 5.", True, True),
    (0, "There are 5 apples.", False, True),  # no answer statement: only the flexible reading finds it
    (0, "The answer is 6.", False, False),
    (0, "The answer is 5. Then I add 1 more: 6", True, False),
    (1, "The answer is $1,080.00", True, True),
    (2, "The answer is 12.50.", True, True),
    (2, "The answer is 12.", False, False),
])
def test_numeric_grader(jsonl, index, completion, strict, flexible):
    t = task(test={"path": str(jsonl)}, columns=COLUMNS)
    g = t.grade(t.problems("test")[index], completion)
    assert (g.strict, g.flexible) == (strict, flexible)


@pytest.mark.parametrize("completion, strict, flexible", [
    ("The capital of France is Paris.\nThe answer is **Paris**.", True, True),
    ("the answer is   paris", True, True),
    ("Paris", False, True),  # the last line is the answer, but not in the asked format
    ("The answer is Paris.\nI hope this helps!", True, False),
    ("The answer is Lyon.", False, False),
    ("The answer is Lyon.\nNo, wait: the answer is Paris.", True, True),  # the last statement is the commitment
    ("The answer is Paris, France.", False, False),  # exact means exact, up to case, spacing and decoration
    ("", False, False),
])
def test_exact_grader(tmp_path, completion, strict, flexible):
    path = write_jsonl(tmp_path / "capitals.jsonl", [{"question": "Capital of France?", "answer": " Paris "}])
    t = task(test={"path": str(path)}, grader="exact")
    g = t.grade(t.problems("test")[0], completion)
    assert (g.strict, g.flexible) == (strict, flexible)
    if strict:
        assert g.answer == "paris"
        assert t.grade({"answer": g.answer}, completion).strict  # an extracted answer stands in for the gold


@pytest.mark.parametrize("completion, strict, flexible", [
    ("Half of one is $\\boxed{\\dfrac{1}{2}}$.", True, True),
    ("So the result is 0.5, that is \\boxed{0.5}", True, True),
    ("The final answer is $\\frac{1}{2}$.", False, True),  # no box: Math-Verify's own extraction only
    ("\\boxed{2}", False, False),
])
def test_math_verify_grader(tmp_path, completion, strict, flexible):
    path = write_jsonl(tmp_path / "math.jsonl", [{"question": "What is 1/2?", "answer": "\\boxed{\\frac12}"}])
    t = task(test={"path": str(path)}, grader={"name": "math_verify", "grading_timeout": 10})
    p = t.problems("test")[0]
    assert p["answer"] == "\\frac12"  # a boxed gold answer is unboxed once, not boxed twice
    g = t.grade(p, completion)
    assert (g.strict, g.flexible) == (strict, flexible)


def test_hashed_ids_are_stable_and_ignore_row_order(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
    rows.append(dict(rows[3]))  # a repeated question
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    a = task(test={"path": str(write_jsonl(tmp_path / "a.jsonl", rows))}).problems("test")
    b = task(test={"path": str(write_jsonl(tmp_path / "b.jsonl", shuffled))}).problems("test")
    ids_a = {(p["question"], p["problem_id"]) for p in a}
    assert ids_a == {(p["question"], p["problem_id"]) for p in b}
    assert len({p["problem_id"] for p in a}) == len(rows)  # unique, the repeat included
    assert a[0]["problem_id"] == question_id(rows[0]["question"]) == "q-" + question_id(" What is 0 + 0? \n")[2:]
    assert (question_id(rows[3]["question"]) + "-2") in {p["problem_id"] for p in a}


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_csv_parquet_and_json_read_as_jsonl(tmp_path, jsonl, fmt):
    path = tmp_path / f"test.{fmt}"
    if fmt == "csv":
        write_csv(path, ROWS)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist([{**r, "final": str(r["final"])} for r in ROWS]), path)
    else:
        path.write_text(json.dumps(ROWS))
    expected = task(test={"path": str(jsonl)}, columns=COLUMNS, breakdown=["topic"]).problems("test")
    assert task(test={"path": str(path)}, columns=COLUMNS, breakdown=["topic"]).problems("test") == expected


def test_csv_cells_are_text_as_written(tmp_path):
    """pandas would read "007" as 7 and "3.50" as 3.5; an exact grader must see what the file says."""
    path = write_csv(tmp_path / "codes.csv", [{"question": "Code?", "answer": "007"}, {"question": "Pi?", "answer": "3.50"}])
    t = task(test={"path": str(path)}, grader="exact")
    assert [p["answer"] for p in t.problems("test")] == ["007", "3.50"]
    assert not t.grade(t.problems("test")[0], "The answer is 7.").strict


def test_a_grader_of_your_own_by_dotted_path(tmp_path):
    path = write_jsonl(tmp_path / "roman.jsonl", [{"question": "Six plus eight?", "answer": "xiv"}])
    t = task(test={"path": str(path)}, grader="tests.task_plugins:Roman")
    problem = t.problems("test")[0]
    assert problem["answer"] == "XIV" and t.prompt(problem)[0]["content"].startswith(
        "Solve the following problem step by step. End with the answer as a Roman numeral.")
    assert t.grade(problem, "6 + 8 = 14, so XIV.").strict and t.grade(problem, "So it is XIIII").strict
    assert not t.grade(problem, "It is XV").strict
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Six plus eight?", "answer": "14"}])
    with pytest.raises(ConfigError, match=r"'14' is not an answer the tests.task_plugins:Roman grader can read; .*"
                                          r"gold answers must be Roman numerals"):
        config(test={"path": str(bad)}, grader="tests.task_plugins:Roman")


def test_label_free_data(tmp_path):
    """`columns: {answer: null}`: no gold is read (the file has no answer column); grading reads the answers and
    judges none, the majority critic votes, and the stages that need gold are refused when the pipeline loads."""
    from selfimprove.critics import CriticContext
    from selfimprove.critics.majority import MajorityCritic
    from selfimprove.pipeline import load_pipeline

    path = write_jsonl(tmp_path / "unlabelled.jsonl", [{"question": "What is 6 * 7?"}, {"question": "What is 2 + 2?"}])
    t = task(test={"path": str(path)}, columns={"answer": None})
    first, second = t.problems("test")
    assert first["answer"] == "" and t.reference_solution(first) is None
    g = t.grade(first, "6 * 7 = 42.\nThe answer is 42.")
    assert (g.correct, g.flexible, g.answer) == (None, None, "42")
    samples = [{**first, "sample_id": f"s{i}", "completion": text} for i, text in
               enumerate(["The answer is 42.", "So 42 it is.", "The answer is 41."])]
    samples.append({**second, "sample_id": "s3", "completion": "The answer is 4."})
    verdicts = MajorityCritic(MajorityCritic.Config(), CriticContext(task=t)).judge(samples)
    assert [v.label for v in verdicts] == [True, True, False, True]
    with pytest.raises(ConfigError, match=r"columns.question: 'problem' is not a column"):
        config(test={"path": str(path)}, columns={"question": "problem", "answer": None})

    def pipeline(stages):
        return {"name": "no-gold", "model": "tiny-random-llama", "stages": stages,
                "task": {"name": "dataset", "test": {"path": str(path)}, "columns": {"answer": None}}}

    load_pipeline(None, data=pipeline({"generate": {"problems": {"split": "test"}},
                                       "critique": {"critics": [{"name": "majority"}]}}))
    for stages, stage in [({"evaluate": {"problems": {"split": "test"}}}, "evaluate"),
                          ({"generate": {"problems": {"split": "test"}, "hint": True}}, "generate"),
                          ({"generate": {"problems": {"split": "test"}}, "spin_pairs": {}}, "spin_pairs")]:
        with pytest.raises(ConfigError, match=rf"stages.{stage}: stage '{stage}' needs gold answers, and task "
                                              r"'dataset' has none \(label-free data\)"):
            load_pipeline(None, data=pipeline(stages))


def test_splits_are_read_separately(tmp_path, jsonl):
    train = write_csv(tmp_path / "train.csv", [{"problem": "What is 7 + 1?", "final": "8", "uid": "t1"}])
    t = task(train={"path": str(train)}, test={"path": str(jsonl)},
             columns={"question": "problem", "answer": "final", "id": "uid"})
    assert [p["problem_id"] for p in t.problems("train")] == ["t1"]
    assert len(t.problems("test")) == 3
    only_test = task(test={"path": str(jsonl)}, columns=COLUMNS)
    with pytest.raises(ValueError, match=r"no train data; add task.train: \{path: ...\}"):
        only_test.problems("train")


# -- refused at config load ---------------------------------------------------------------------------------------
def _bad_cases(tmp_path, jsonl):
    (tmp_path / "data.txt").write_text("question,answer\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    write_csv(tmp_path / "empty.csv", [{"problem": "x", "final": "1"}])
    (tmp_path / "empty.csv").write_text("problem,final\n")
    pq.write_table(pa.table({"problem": pa.array([], pa.string()), "final": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    test = {"path": str(jsonl)}
    return [
        ({"test": {"path": str(tmp_path / "missing.jsonl")}, "columns": COLUMNS},
         "task.test: path: no such file '" + str(tmp_path / "missing.jsonl") + "'"),
        ({"test": {"path": str(tmp_path / "data.txt")}},
         "task.test: path: '" + str(tmp_path / "data.txt") + "' has extension .txt; supported: .jsonl, .json, "
         ".parquet, .csv"),
        ({"test": test, "columns": {**COLUMNS, "answer": "gold"}},
         f"task: columns.answer: 'gold' is not a column of the test data ({jsonl}); its columns: uid, problem, "
         f"final, worked, topic"),
        ({"test": test}, "task: columns.question: 'question' is not a column"),  # the default names, not in this file
        ({"test": test, "columns": {**COLUMNS, "id": "key"}}, "task: columns.id: 'key' is not a column"),
        ({"test": test, "columns": COLUMNS, "breakdown": ["topic", "level"]},
         "task: breakdown[1]: 'level' is not a column"),
        ({"test": {"path": str(tmp_path / "empty.jsonl")}}, "task: test.path: " + str(tmp_path / "empty.jsonl") +
         " has no rows"),
        ({"test": {"path": str(tmp_path / "empty.csv")}}, "has no rows"),
        ({"test": {"path": str(tmp_path / "empty.parquet")}}, "has no rows"),
        ({"test": test, "columns": COLUMNS, "grader": "fuzzy"},
         "task.grader: unknown grader 'fuzzy'; valid names: exact, math_verify, numeric"),
        ({"test": test, "columns": {**COLUMNS, "answer": "topic"}},
         f"task: test.path: {jsonl} row 1, column 'topic' (columns.answer): 'add' is not an answer the numeric grader "
         f"can read; fix or drop that row; if the whole column reads like this, it needs a number"),
        ({"columns": COLUMNS}, "task: give the data of train and/or test"),
        ({"test": {"path": str(jsonl), "hub": "someone/data"}}, "task.test: give either path"),
        ({"test": {"hub": "someone/data"}}, "task.test: split: required with hub 'someone/data'"),
        ({"test": {"hub": "selfimprove-tests/never-cached", "split": "test"}, "columns": COLUMNS},
         "task: test.hub: hub dataset 'selfimprove-tests/never-cached' split 'test' is not in the local datasets "
         "cache, and nothing is downloaded"),
        ({"test": test, "columns": COLUMNS, "hint": "(It is {gold}.)"}, "task: hint: '(It is {gold}.)' must contain"),
        ({"test": test, "colums": COLUMNS}, "task.colums: unknown key; valid keys of DatasetTask.Config"),
    ]


def test_bad_input_is_refused_when_the_config_is_built(tmp_path, jsonl):
    for params, fragment in _bad_cases(tmp_path, jsonl):
        try:
            config(**params)
        except ConfigError as err:
            assert fragment in str(err), (params, str(err))
            assert str(err).startswith("pipe.yaml: task")
        else:
            pytest.fail(f"accepted {params}")


def test_every_row_is_checked_when_the_config_is_built(tmp_path):
    """A bad row anywhere in the file (here the last of three) stops the config load, naming its row, column and
    fix: `--check` catches it, not the run minutes later."""
    good = [{"question": "What is 1 + 1?", "answer": "2", "id": "a"},
            {"question": "What is 1 + 2?", "answer": 3, "id": "b"}]
    cases = [
        ({"question": "x", "answer": "1", "id": "c"}, "line 4 is not valid JSON", "{not json\n"),
        ({"question": "What is 2 + 2?", "answer": None, "id": "c"},
         "row 3, column 'answer' (columns.answer): None is not an answer the numeric grader can read; fix or drop", ""),
        ({"question": "What is 2 + 2?", "answer": "seven", "id": "c"},
         "row 3, column 'answer' (columns.answer): 'seven' is not", ""),
        ({"question": "What is 2 + 2?", "answer": "4", "id": "a"},
         "row 3, column 'id' (columns.id): id 'a' repeats row 1", ""),
        ({"question": " ", "answer": "4", "id": "c"},
         "row 3, column 'question' (columns.question): empty question", ""),
        ({"question": "What is 2 + 2?", "id": "c"},  # datasets reads a key missing from a row as null
         "row 3, column 'answer' (columns.answer): None is not an answer the numeric grader can read", ""),
        ({"question": "What is 2 + 2?", "answer": "4"},
         "row 3 has no 'id' (columns.id); every row needs it: add it to that row, or map columns.id", ""),
    ]
    for i, (bad, fragment, tail) in enumerate(cases):
        path = tmp_path / f"data{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in [*good, bad]) + tail)
        with pytest.raises(ConfigError, match=re.escape(f"pipe.yaml: task: test.path: ") + ".*" + re.escape(fragment)):
            config(test={"path": str(path)}, columns={"id": "id"})
    path = write_jsonl(tmp_path / "ok.jsonl", good)
    assert [p["answer"] for p in task(test={"path": str(path)}, columns={"id": "id"}).problems("test")] == ["2", "3"]


def test_an_edited_file_is_read_again(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "What is 1 + 1?", "answer": "2"}])
    t = task(test={"path": str(path)})
    assert len(t.problems("test")) == 1
    write_jsonl(path, [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"}])
    assert len(t.problems("test")) == 2


def test_dataset_task_in_a_pipeline(tmp_path, jsonl):
    """Through load_pipeline: the task resolves by name and its data errors stop the load (no model is loaded)."""
    from selfimprove.pipeline import load_pipeline

    def pipeline(task_params):
        return {"name": "own-data", "model": "tiny-random-llama", "task": {"name": "dataset", **task_params},
                "stages": {"evaluate": {"type": "evaluate", "problems": {"split": "test"}}}}

    load_pipeline(None, data=pipeline({"test": {"path": str(jsonl)}, "columns": COLUMNS}))
    with pytest.raises(ConfigError, match=r"<pipeline>: task: columns.answer: 'gold' is not a column"):
        load_pipeline(None, data=pipeline({"test": {"path": str(jsonl)}, "columns": {**COLUMNS, "answer": "gold"}}))
