"""A task over a researcher's own data: name the files, the columns and a grader; no task class to write.

The user reference (data sources, splits, columns, graders, what bad data is refused) is docs/tasks.md. Rows are
read with `datasets` and streamed: the config check validates every row and keeps none, and the run reads them
again through the same function (`_problems`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..records import Prompt
from ..registry import TASKS, GraderSpec
from .base import Grade, Task, chat_prompt
from .overlap import file_splits

# The `datasets` builder that reads each format.
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


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
    answer: str | None = "answer"  # the gold final answer; None = label-free data (no gold)
    solution: str | None = None  # a worked solution (SFT/SPIN gold); None = the data has none
    id: str | None = None  # unique problem ids; None = a hash of the question


@TASKS.register("dataset")
class DatasetTask(Task):
    """Problems from the researcher's own files (module docstring: data, columns, graders)."""

    splits = ("train", "test", "dev")

    @classmethod
    def available_splits(cls, config) -> tuple[str, ...]:
        return tuple(split for split in cls.splits if _has(config, split))

    @classmethod
    def has_gold(cls, config) -> bool:
        return config.columns.answer is not None

    @dataclass
    class Config:
        train: Source | None = None
        test: Source | None = None
        dev: Source | None = None  # for choices (prompt, temperatures, ...); or carve it from train: dev_fraction
        dev_fraction: float = 0.0  # the share of train held out as dev (without a dev file)
        dev_seed: int = 0  # which train problems dev_fraction holds out
        columns: Columns = field(default_factory=Columns)
        grader: GraderSpec = field(default_factory=lambda: GraderSpec.named("numeric"))  # tasks/graders.py
        instruction: str = "Solve the following problem step by step."
        answer_format: str | None = None  # the prompt's answer-format sentence; None = the grader's
        hint: str = ("(The correct answer is {answer}. Explain step by step how to reach it, without mentioning "
                     "that you were told.)")  # STaR's rationalization hint; {answer} is the gold answer
        breakdown: list[str] = field(default_factory=list)  # columns to carry and report accuracy by

        def __post_init__(self):
            if self.train is None and self.test is None:
                raise ValueError("give the data of train and/or test, e.g. test: {path: data/test.jsonl}")
            if not 0 <= self.dev_fraction < 1:
                raise ValueError(f"dev_fraction: {self.dev_fraction} must be in [0, 1): the share of train held out "
                                 f"as dev")
            if self.dev_fraction > 0 and self.dev is not None:
                raise ValueError("dev_fraction: give either a dev file (dev: {path: ...}) or dev_fraction, not both")
            if self.dev_fraction > 0 and self.train is None:
                raise ValueError("dev_fraction: there is no train data to carve dev from; add train: {path: ...}")
            if "{answer}" not in self.hint:
                raise ValueError(f"hint: {self.hint!r} must contain {{answer}}, where the gold answer goes")
            try:
                self.hint.format(answer="")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(f"hint: {self.hint!r} may hold no braces but {{answer}} (write {{{{ for a "
                                 f"literal brace): {err!r}") from None
            grader = _grader(self.grader)
            for split in DatasetTask.splits:
                if getattr(self, split) is not None:
                    _check(split, getattr(self, split), self.columns, tuple(self.breakdown), grader)

    def __init__(self, config):
        super().__init__(config)
        self.breakdown = tuple(config.breakdown)
        self.grader = _grader(config.grader)
        answer_format = config.answer_format if config.answer_format is not None else self.grader.answer_format
        self._instruction = f"{config.instruction} {answer_format}".strip()
        self._read_at: dict[str, tuple] = {}  # split → (file stamp, problems): an edited file is read again

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
        source = getattr(self.config, split)
        if source is None:
            return None
        stat = Path(source.path).stat() if source.path is not None else None
        stamp = (stat.st_mtime_ns, stat.st_size) if stat else ()
        if self._read_at.get(split, (None,))[0] != stamp:
            self._read_at[split] = stamp, list(_problems(source, self.config.columns, self.breakdown, self.grader))
        return self._read_at[split][1]

    def prompt(self, problem: dict, hint: bool = False) -> Prompt:
        return chat_prompt(self._instruction, problem["question"], (),
                           self.config.hint.format(answer=problem["answer"]) if hint else None)

    def grade(self, problem: dict, completion: str) -> Grade:
        if problem["answer"]:
            return self.grader.grade(completion, problem["answer"])
        # label-free: graded against a placeholder gold only to read the answers; nothing is judged
        grade = self.grader.grade(completion, "0")
        return Grade(None, None, grade.strict_answer, grade.flexible_answer)

    def reference_solution(self, problem: dict) -> str | None:
        return problem.get("solution") or None


def _has(config, split: str) -> bool:
    # dev_fraction carves dev out of train, which Config.__post_init__ has made sure is given
    return getattr(config, split) is not None or (split == "dev" and config.dev_fraction > 0)


def _grader(spec: GraderSpec):
    grader = spec.build()
    grader.name = spec.name  # errors name it as the YAML does
    return grader


def _check(split: str, source: Source, columns: Columns, breakdown: tuple[str, ...], grader) -> None:
    """Refuse data the run could not use: the column names first (to list them), then every row, streamed."""
    key = f"{split}.path" if source.path is not None else f"{split}.hub"
    try:
        first = next(iter(_rows(source)), None)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    if first is None:
        raise ValueError(f"{key}: {source.describe()} has no rows; point {split} at data with problems in it")
    wanted = [(f"columns.{name}", getattr(columns, name)) for name in ("question", "answer", "solution", "id")]
    wanted += [(f"breakdown[{i}]", column) for i, column in enumerate(breakdown)]
    for field_key, column in wanted:
        if column is not None and column not in first:
            raise ValueError(f"{field_key}: {column!r} is not a column of the {split} data ({source.describe()}); "
                             f"its columns: {', '.join(first)}")
    try:  # one row at a time, nothing kept but the ids: a bad row is found here, not minutes into the run
        deque(_problems(source, columns, breakdown, grader), maxlen=0)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


# -- reading ------------------------------------------------------------------------------------------------------
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


def _rows(source: Source):
    """Every row of `source`, one at a time, as `datasets` streams it (a missing value is None)."""
    if source.hub is not None:
        yield from _hub(source.hub, source.hub_config, source.split)
        return
    from datasets import Features, Value, load_dataset
    from datasets.exceptions import DatasetGenerationError

    builder, options = FORMATS[Path(source.path).suffix.lower()], {}
    if builder == "parquet":
        import pyarrow.parquet as pq

        if pq.read_metadata(source.path).num_rows == 0:  # datasets fails on a file without rows
            return
    else:
        options["encoding"] = "utf-8-sig"  # a byte-order mark is not part of the first column's name
    try:
        with _offline():
            if builder == "csv":  # cells are text as written; pandas' guessing reads "007" as 7 and "3.50" as 3.5
                header = next(iter(load_dataset(builder, data_files=source.path, split="train", streaming=True,
                                                **options)), None)
                options["features"] = Features({name: Value("string") for name in header}) if header else None
            yield from load_dataset(builder, data_files=source.path, split="train", streaming=True, **options)
    except (ValueError, OSError, DatasetGenerationError) as err:
        raise ValueError(f"cannot read {source.path} as {Path(source.path).suffix[1:]}: "
                         f"{_bad_json_line(source.path) or err}") from None


def _bad_json_line(path: str) -> str | None:
    """Which line of a .jsonl file is not a JSON object (`datasets` says what is wrong, not where)."""
    if not path.lower().endswith(".jsonl"):
        return None
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            try:
                if line.strip() and not isinstance(json.loads(line), dict):
                    return f"line {number} is not a JSON object (one row per line)"
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON: {err}"
    return None


def _problems(source: Source, columns: Columns, breakdown: tuple[str, ...], grader):
    """The problems of one split, one at a time; a row the run could not use is a ValueError naming its number,
    column and fix. The config check and the run read rows through this one function."""
    ids, repeats = {}, Counter()
    for number, row in enumerate(_rows(source), 1):
        where = f"{source.describe()} row {number}"
        for field_key, column in (("columns.question", columns.question), ("columns.id", columns.id)):
            if column is not None and row.get(column) is None:
                raise ValueError(f"{where} has no {column!r} ({field_key}); every row needs it: add it to that row, "
                                 f"or map {field_key} to a column every row has")
        question = str(row[columns.question])
        if not question.strip():
            raise ValueError(f"{where}, column {columns.question!r} (columns.question): empty question; "
                             f"fill it in or drop that row")
        answer = ""  # label-free data (columns.answer: null) has no gold
        if columns.answer is not None:
            value = row.get(columns.answer)
            answer = grader.gold(str(value).strip()) if value is not None and str(value).strip() else None
            if answer is None:
                raise ValueError(f"{where}, column {columns.answer!r} (columns.answer): {value!r} is not an answer "
                                 f"the {grader.name} grader can read; fix or drop that row; if the whole column reads "
                                 f"like this, {grader.gold_help}")
        if columns.id is not None:
            problem_id = str(row[columns.id])
            if problem_id in ids:
                raise ValueError(f"{where}, column {columns.id!r} (columns.id): id {problem_id!r} repeats row "
                                 f"{ids[problem_id]}; ids must be unique within a split (or drop columns.id to hash "
                                 f"the questions)")
            ids[problem_id] = number
        else:
            problem_id = question_id(question)
            repeats[problem_id] += 1
            if repeats[problem_id] > 1:
                problem_id = f"{problem_id}-{repeats[problem_id]}"
        problem = {"problem_id": problem_id, "question": question, "answer": answer}
        if columns.solution is not None:
            problem["solution"] = "" if row.get(columns.solution) is None else str(row[columns.solution])
        problem.update({column: row.get(column) for column in breakdown})
        yield problem


def question_id(question: str) -> str:
    """A problem id from the question's text alone: the same question has the same id in every run and order."""
    return "q-" + hashlib.sha256(question.strip().encode("utf-8")).hexdigest()[:16]
