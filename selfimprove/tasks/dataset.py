"""A task over a researcher's own data: name the files, the columns and a grader; no task class to write.

    task:
      name: dataset
      train: {path: data/train.jsonl}
      test: {path: data/test.parquet}
      columns: {question: problem, answer: final_answer, solution: worked_solution, id: uid}
      grader: numeric
      instruction: Solve the following problem step by step.

Data, per split (`train`, `test`, optionally `dev`; give train and/or test):
- `path`: a local `.jsonl`, `.json` (an array of objects), `.parquet` or `.csv` file; a relative path is read
  from the working directory.
- `hub` + `split` (+ `hub_config`): a Hugging Face `datasets` dataset that is already in the local cache. Nothing
  is downloaded, at config load or at run time: the name is resolved offline, so a dataset that is not cached is
  refused. Cache it once on a machine with a network (`datasets.load_dataset(name)`), or export it to a file.

Splits are kept disjoint (tasks/overlap.py): a dev problem whose question (up to spacing) is in test, and a train
problem whose question is in dev or test, is dropped, and the count is logged. `dev` is where choices are made:
give it a file of its own (`dev: {path: ...}`), or carve it out of train with `dev_fraction` (a fixed slice,
chosen by random.Random(`dev_seed`)); without either the task has no dev split.

Columns: `question` and `answer` are required (default names: question, answer). `solution` is a worked solution,
the gold completion of SFT and SPIN (`reference_solution`); it should end in the answer format the prompt asks
for. `id` names each problem; without it a problem's id is a hash of its question, so ids are stable across runs
and do not depend on row order (a repeated question gets -2, -3, ... in file order). `breakdown` columns are
carried into every problem, and the evaluate stage reports accuracy per value of each.

Graders (strict = the answer format the prompt asks for, flexible = a looser reading, as for GSM8K):
- `numeric` (GSM8K's extraction, tasks/numeric.py): strict "The answer is N", flexible the last number. A gold
  answer may be a bare number or end in "#### N" / "The answer is N.".
- `math_verify` (MATH's grading, tasks/math.py, under `grading_timeout`): strict the last \\boxed{}, flexible
  Math-Verify's own extraction; gold answers are LaTeX (a boxed gold answer is unboxed).
- `exact`: normalised string equality (case, runs of spaces, surrounding quotes or bold, a final period are
  ignored); strict the rest of the line after the last "The answer is", flexible the last non-empty line.

Bad data is refused when the config is built (and by `selfimprove run --check`), before any model loads: a
missing file, an unsupported format, a column the data lacks, no rows, and any row with a missing column, an
empty question, a gold answer the grader cannot read (`null`, "seven" under `numeric`) or a repeated id, named by
row number and column with the fix. The check streams the rows and keeps none (a `.json` array is parsed whole,
once, and kept for the run); the run reads them again through the same function.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

from ..records import Prompt
from ..registry import TASKS
from .base import Grade, Task, chat_prompt
from .math import MathTask, last_boxed
from .numeric import extract_flexible, extract_strict, normalize_number, same_number
from .overlap import file_splits

FORMATS = (".jsonl", ".json", ".parquet", ".csv")

# The sentence each grader's strict reading expects; the prompt ends with it unless `answer_format` replaces it.
ANSWER_FORMATS = {
    "numeric": 'At the end, write "The answer is <number>." with the final number.',
    "math_verify": "Put your final answer within \\boxed{}.",
    "exact": 'End with "The answer is <answer>."',
}

_EDGES = re.compile(r"^[\s*_`\"']+|[\s*_`\"'.]+$")
_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is:?[ \t]*([^\n]*)")


@dataclass(frozen=True)
class Source:
    """One split's data: a local file (`path`), or a dataset in the local `datasets` cache (`hub` + `split`)."""

    path: str | None = None  # .jsonl, .json (an array of objects), .parquet or .csv
    hub: str | None = None  # a hub dataset name, read from the local cache only
    hub_config: str | None = None
    split: str | None = None  # the hub dataset's split (required with hub)

    def __post_init__(self):
        if (self.path is None) == (self.hub is None):
            raise ValueError("give either path (a local .jsonl/.json/.parquet/.csv file) or hub (a dataset in the "
                             "local datasets cache, with its split), not both or neither")
        if self.hub is not None:
            if self.split is None:
                raise ValueError(f"split: required with hub {self.hub!r}: which of its splits to read, "
                                 f"e.g. split: test")
            return
        if self.hub_config is not None or self.split is not None:
            raise ValueError("hub_config and split go with hub; a file is one split already")
        suffix = Path(self.path).suffix.lower()
        if suffix not in FORMATS:
            raise ValueError(f"path: {self.path!r} has extension {suffix or '(none)'}; supported: "
                             f"{', '.join(FORMATS)}: convert the file, or use hub: for a cached hub dataset")
        if not Path(self.path).is_file():
            raise ValueError(f"path: no such file {self.path!r} (a relative path is read from the working "
                             f"directory, {Path.cwd()}); fix the path")

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        config = f" ({self.hub_config})" if self.hub_config else ""
        return f"hub dataset {self.hub!r}{config} split {self.split!r}"


@dataclass(frozen=True)
class Columns:
    """Which column of the data holds what."""

    question: str = "question"
    answer: str = "answer"  # the gold final answer
    solution: str | None = None  # a worked solution (SFT/SPIN gold); None = the data has none
    id: str | None = None  # unique problem ids; None = a hash of the question


@TASKS.register("dataset")
class DatasetTask(Task):
    """Problems from the researcher's own files (module docstring: data, columns, graders)."""

    splits = ("train", "test", "dev")

    @classmethod
    def available_splits(cls, config) -> tuple[str, ...]:
        return tuple(split for split in cls.splits if _has(config, split))

    @dataclass
    class Config:
        train: Source | None = None
        test: Source | None = None
        dev: Source | None = None  # for choices (prompt, temperatures, ...); or carve it from train: dev_fraction
        dev_fraction: float = 0.0  # the share of train held out as dev (without a dev file)
        dev_seed: int = 0  # which train problems dev_fraction holds out
        columns: Columns = field(default_factory=Columns)
        grader: Literal["numeric", "math_verify", "exact"] = "numeric"
        instruction: str = "Solve the following problem step by step."
        answer_format: str | None = None  # the prompt's answer-format sentence; None = the grader's (ANSWER_FORMATS)
        hint: str = ("(The correct answer is {answer}. Explain step by step how to reach it, without mentioning "
                     "that you were told.)")  # STaR's rationalization hint; {answer} is the gold answer
        breakdown: list[str] = field(default_factory=list)  # columns to carry and report accuracy by
        grading_timeout: float = 5.0  # math_verify: seconds per Math-Verify parse or comparison

        def __post_init__(self):
            if self.train is None and self.test is None:
                raise ValueError("give the data of train and/or test, e.g. test: {path: data/test.jsonl}")
            if self.grading_timeout <= 0:
                raise ValueError("grading_timeout must be > 0 seconds")
            _check_dev(self)
            if "{answer}" not in self.hint:
                raise ValueError(f"hint: {self.hint!r} must contain {{answer}}, where the gold answer goes")
            try:
                self.hint.format(answer="")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"hint: {self.hint!r} may hold no braces but {{answer}} (write {{{{ for a "
                                 f"literal brace): {err!r}") from None
            for split in DatasetTask.splits:
                if getattr(self, split) is not None:
                    _check(split, getattr(self, split), self.columns, self.breakdown, self.grader)

    def __init__(self, config):
        super().__init__(config)
        self.breakdown = tuple(config.breakdown)
        answer_format = config.answer_format if config.answer_format is not None else ANSWER_FORMATS[config.grader]
        self._instruction = f"{config.instruction} {answer_format}".strip()
        # MATH's grading as it is, Math-Verify calls and time limit included: the grader reads only `answer`.
        self._math = MathTask(MathTask.Config(grading_timeout=config.grading_timeout)) \
            if config.grader == "math_verify" else None

    def problems(self, split: str) -> list[dict]:
        self.check_split(split)
        c = self.config
        if not _has(c, split):
            raise ValueError(f"task dataset has no {split} data; add task.{split}: {{path: ...}}"
                             + (" or task.dev_fraction" if split == "dev" else ""))
        if split == "test":  # as read: the held-out splits are taken out of the others, never the reverse
            return [dict(p) for p in self._read(split)]
        if "_splits" not in self.__dict__:  # once per task: the duplicates dropped are logged once
            self._splits = file_splits(self._read, self.canonical, c.dev_fraction, c.dev_seed, "task dataset")
        return [dict(p) for p in self._splits[split]]

    def _read(self, split: str) -> list[dict] | None:
        """One split's file as it is (None when the config gives no file for it)."""
        c, source = self.config, getattr(self.config, split)
        return None if source is None else list(_load(source, _stamp(source), c.columns, tuple(c.breakdown), c.grader))

    def prompt(self, problem: dict, hint: bool = False) -> Prompt:
        return chat_prompt(self._instruction, problem["question"], (),
                           self.config.hint.format(answer=problem["answer"]) if hint else None)

    def grade(self, problem: dict, completion: str) -> Grade:
        grader, gold = self.config.grader, problem["answer"]
        if grader == "math_verify":
            return self._math.grade(problem, completion)
        if grader == "numeric":
            strict, flexible = extract_strict(completion), extract_flexible(completion)
            return Grade(same_number(strict, gold), same_number(flexible, gold), strict, flexible)
        strict, flexible = _strict_text(completion), _flexible_text(completion)
        gold = normalize_text(gold)
        return Grade(strict is not None and strict == gold, flexible is not None and flexible == gold, strict, flexible)

    def reference_solution(self, problem: dict) -> str | None:
        return problem.get("solution") or None


def _has(config, split: str) -> bool:
    if split == "dev" and config.dev is None:
        return config.dev_fraction > 0 and config.train is not None
    return getattr(config, split) is not None


def _check_dev(config) -> None:
    if not 0 <= config.dev_fraction < 1:
        raise ValueError(f"dev_fraction: {config.dev_fraction} must be in [0, 1): the share of train held out as dev")
    if config.dev_fraction > 0 and config.dev is not None:
        raise ValueError("dev_fraction: give either a dev file (dev: {path: ...}) or dev_fraction, not both")
    if config.dev_fraction > 0 and config.train is None:
        raise ValueError("dev_fraction: there is no train data to carve dev from; add train: {path: ...}")


# -- exact grading ------------------------------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes, bold or backticks, no final period: "**Paris**." → "paris".

    Idempotent, so an extracted answer put in place of the gold (majority votes) compares as the gold does."""
    text = " ".join(str(text).split()).casefold()
    return _EDGES.sub("", text)


def _strict_text(completion: str) -> str | None:
    """The rest of the line after the last "The answer is" (the format the prompt asks for)."""
    matches = _ANSWER_IS.findall(completion)
    return normalize_text(matches[-1]) if matches and matches[-1].strip() else None


def _flexible_text(completion: str) -> str | None:
    """The last non-empty line, after its last "answer is" or "answer:" when it has one."""
    lines = [line for line in completion.splitlines() if line.strip()]
    if not lines:
        return None
    last = re.split(r"answer(?: is|:)", lines[-1], flags=re.IGNORECASE)[-1]
    return normalize_text(last) or None


# -- checks at config load ----------------------------------------------------------------------------------------
def _check(split: str, source: Source, columns: Columns, breakdown: list[str], grader: str) -> None:
    """Refuse data the run could not use: the column names first (to list them), then every row, streamed."""
    key = f"{split}.path" if source.path is not None else f"{split}.hub"
    names, first = _peek(source, key)
    if first is None:
        raise ValueError(f"{key}: {source.describe()} has no rows; point {split} at data with problems in it")
    wanted = [(f"columns.{name}", getattr(columns, name)) for name in ("question", "answer", "solution", "id")]
    wanted += [(f"breakdown[{i}]", column) for i, column in enumerate(breakdown)]
    for field_key, column in wanted:
        if column is not None and column not in names:
            raise ValueError(f"{field_key}: {column!r} is not a column of the {split} data ({source.describe()}); "
                             f"its columns: {', '.join(names)}")
    try:  # one row at a time, nothing kept but the ids: a bad row is found here, not minutes into the run
        for _ in _problems(source, columns, tuple(breakdown), grader):
            pass
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


_GOLD_HELP = {
    "numeric": "it needs a number (or text ending in '#### N' or 'The answer is N'): map columns.answer to the "
               "final-answer column, or choose grader: exact or math_verify",
    "math_verify": "map columns.answer to a column of non-empty final answers",
    "exact": "map columns.answer to a column of non-empty final answers",
}
_FIX_ROW = "fix or drop that row; if the whole column reads like this, "


def gold_answer(value, grader: str) -> str | None:
    """The gold answer as grading compares it, or None when the grader cannot read `value`."""
    text = "" if value is None else str(value).strip()
    if not text:
        return None
    if grader == "numeric":
        return normalize_number(text) or extract_strict(text)
    if grader == "math_verify":
        return (last_boxed(text) or text).strip() or None
    return text


# -- reading ------------------------------------------------------------------------------------------------------
def _stamp(source: Source) -> tuple:
    """Part of the cache key: an edited file is read again, an unchanged one is not."""
    if source.path is None:
        return ()
    stat = Path(source.path).stat()
    return stat.st_mtime_ns, stat.st_size


def _peek(source: Source, key: str) -> tuple[list[str], dict | None]:
    """The column names and the first row (None when there is none), reading as little as the format allows."""
    if source.hub is not None:
        try:
            data = _hub(source.hub, source.hub_config, source.split)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None
        return list(data.column_names), (data[0] if len(data) else None)
    path, suffix = Path(source.path), Path(source.path).suffix.lower()
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        row = _json_row(line, source.path, number)
                        return list(row), row
            return [], None
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                first = next(reader, None)
                return list(reader.fieldnames or []), first
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
            if parquet.metadata.num_rows == 0:
                return names, None
            return names, next(parquet.iter_batches(batch_size=1)).to_pylist()[0]
        rows = _json_array(source.path, _stamp(source))
        return (list(rows[0]), rows[0]) if rows else ([], None)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:  # pyarrow's errors are ValueErrors too
        raise ValueError(f"{key}: cannot read {source.path} as {suffix[1:]}: {err}") from None


def _json_row(line: str, path: str, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {number} is not valid JSON: {err}") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path} line {number} is not a JSON object (one row per line)")
    return row


@lru_cache(maxsize=4)
def _json_array(path: str, stamp: tuple) -> tuple[dict, ...]:
    """A whole .json file: JSON has no first row without parsing it all, so the check's parse is kept for the run."""
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path} must hold a JSON array of objects, one per row (or use .jsonl)")
    return tuple(rows)


@contextmanager
def _offline():
    """`datasets` reads its offline flag at call time: forcing it makes load_dataset use the local cache only."""
    import datasets.config

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


@lru_cache(maxsize=8)
def _hub(name: str, hub_config: str | None, split: str):
    """A cached hub dataset (memory-mapped Arrow: the check and the run share it, and neither copies it)."""
    from datasets import load_dataset

    try:
        with _offline():
            return load_dataset(name, hub_config, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise ValueError(
            f"{Source(hub=name, hub_config=hub_config, split=split).describe()} is not in the local datasets cache, "
            f"and nothing is downloaded: cache it once where there is a network (datasets.load_dataset), or export "
            f"it to a .jsonl/.parquet file and use path: ({type(err).__name__}: {err})") from None


def _rows(source: Source, columns: tuple[str, ...]):
    """Every row of `source`, one at a time (only `columns`, where the format can skip the others)."""
    if source.hub is not None:
        yield from _hub(source.hub, source.hub_config, source.split).select_columns(list(columns))
        return
    path, suffix = Path(source.path), Path(source.path).suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8-sig") as f:
            yield from (_json_row(line, source.path, n) for n, line in enumerate(f, 1) if line.strip())
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            yield from csv.DictReader(f)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=list(columns)):
            yield from batch.to_pylist()
    else:
        yield from _json_array(source.path, _stamp(source))


@lru_cache(maxsize=8)
def _load(source: Source, stamp: tuple, columns: Columns, breakdown: tuple[str, ...], grader: str) -> tuple[dict, ...]:
    """The problems of one split. `stamp` only keys the cache (see `_stamp`)."""
    return tuple(_problems(source, columns, breakdown, grader))


def _problems(source: Source, columns: Columns, breakdown: tuple[str, ...], grader: str):
    """The problems of one split, one at a time; a row the run could not use is a ValueError naming its number,
    column and fix. The config check and the run read rows through this one function."""
    fields = {"question": columns.question, "answer": columns.answer, "solution": columns.solution, "id": columns.id}
    fields = {f"columns.{k}": c for k, c in fields.items() if c is not None}
    fields.update({f"breakdown[{i}]": c for i, c in enumerate(breakdown)})
    wanted = tuple(dict.fromkeys(fields.values()))
    ids, repeats = {}, {}
    for number, row in enumerate(_rows(source, wanted), 1):
        where = f"{source.describe()} row {number}"
        missing = [(k, c) for k, c in fields.items() if c not in row]
        if missing:
            field_key, column = missing[0]
            raise ValueError(f"{where} has no {column!r} ({field_key}); every row needs it: add it to that row, or "
                             f"map {field_key} to a column every row has")
        question = "" if row[columns.question] is None else str(row[columns.question])
        if not question.strip():
            raise ValueError(f"{where}, column {columns.question!r} (columns.question): empty question; "
                             f"fill it in or drop that row")
        answer = gold_answer(row[columns.answer], grader)
        if answer is None:
            raise ValueError(f"{where}, column {columns.answer!r} (columns.answer): {row[columns.answer]!r} is not "
                             f"an answer the {grader} grader can read; {_FIX_ROW}{_GOLD_HELP[grader]}")
        if columns.id is not None:
            problem_id = str(row[columns.id])
            if problem_id in ids:
                raise ValueError(f"{where}, column {columns.id!r} (columns.id): id {problem_id!r} repeats row "
                                 f"{ids[problem_id]}; ids must be unique within a split (or drop columns.id to hash "
                                 f"the questions)")
            ids[problem_id] = number
        else:
            problem_id = question_id(question)
            repeats[problem_id] = repeats.get(problem_id, 0) + 1
            if repeats[problem_id] > 1:
                problem_id = f"{problem_id}-{repeats[problem_id]}"
        problem = {"problem_id": problem_id, "question": question, "answer": answer}
        if columns.solution is not None:
            problem["solution"] = "" if row[columns.solution] is None else str(row[columns.solution])
        problem.update({column: row[column] for column in breakdown})
        yield problem


def question_id(question: str) -> str:
    """A problem id from the question's text alone: the same question has the same id in every run and order."""
    return "q-" + hashlib.sha256(question.strip().encode("utf-8")).hexdigest()[:16]
