"""MATH (Hendrycks et al., 2021): competition problems with LaTeX answers, graded with Math-Verify.

Two registered names, differing only in the test set:
- `math500`: test = MATH500, PRM800K's 500-problem test split (`seeds/math/test.jsonl`);
- `math`: test = the full 5,000-problem MATH test set (`seeds/math/test_full.jsonl`).
Both train on `seeds/math/train_reconstructed.jsonl`: the 7,500 MATH train problems plus the 4,500 MATH test
problems outside MATH500 (PRM800K's train split, rebuilt; see `seeds/math/README.md`). That file therefore
overlaps the full test set: train always drops every problem whose text (up to spacing) is in the task's test
set, counted in the log (tasks/overlap.py), so `math` trains on the 7,500 original train problems (7,499: one
repeats a test problem's text) and `math500` on all 12,000. `dev` is then a fixed slice of that train set
(`num_dev` problems chosen by random.Random(`dev_seed`)), and `train` the rest: choices are made on dev.

`source: <hub dataset>` (e.g. `HuggingFaceH4/MATH-500`) reads a hub dataset instead, mapping `hub_splits`
onto ours; rows need `problem` and `solution` (or `answer`), and may name the subject `type` and give the
level as "Level 3", as the original release does.

Grading (the only place MATH answers are parsed):
- strict: the content of the *last* `\\boxed{...}` in the completion (brace-matched), verified equal to the
  gold answer by Math-Verify; no box, no credit.
- flexible: Math-Verify's own extraction over the whole completion (boxed, "final answer is", LaTeX
  environments, then bare expressions), verified the same way.
Every Math-Verify call runs under `grading_timeout` seconds (selfimprove.timeouts); a pathological expression
that runs past it counts as no answer / not equal, so it cannot stall a run.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from ..records import Prompt
from ..registry import TASKS
from ..shipped import root
from ..timeouts import TimedOut, call_with_timeout
from .base import Grade, Task, chat_prompt, same_text
from .overlap import carve, drop_seen

SEEDS = root() / "seeds" / "math"

INSTRUCTION = "Solve the following math problem step by step. Put your final answer within \\boxed{}."
HINT = ("(The correct answer is ${answer}$. Explain step by step how to reach it, and put it within \\boxed{{}}, "
        "without mentioning that you were told.)")

log = logging.getLogger(__name__)


class _NoTimeoutWarning(logging.Filter):
    """Math-Verify warns once that its signal timeouts are off: we turn them off on purpose (see timeouts.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoTimeoutWarning())


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, found by brace matching; a backslash
    escapes the next character, so `\\{` and `\\}` do not count. `\\boxed 5` (no braces) gives "5"."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{|\s+[^\s$]+)", text)]
    for match in reversed(starts):
        if match.group(1) != "{":
            return match.group(1).strip()
        depth, i = 1, match.end()
        while i < len(text):
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            depth += ch == "{"
            depth -= ch == "}"
            if depth == 0:
                return text[match.end():i]
            i += 1
    return None


class MathTask(Task):
    """Shared by `math500` and `math`; subclasses set `test_file`."""

    test_file: str
    splits = ("train", "test", "dev")
    breakdown = ("subject", "level")  # the evaluate stage's default accuracy breakdowns

    @dataclass
    class Config:
        source: str = "seeds"  # "seeds" (shipped files) or a hub dataset name
        hub_config: str | None = None
        hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})
        prompt_format: Literal["chat", "fewshot"] = "chat"
        num_shots: int = 4  # fewshot: short worked train solutions shown as earlier turns
        grading_timeout: float = 5.0  # seconds per Math-Verify parse or comparison
        num_dev: int = 500  # held out of train for choices (prompt, temperature, ...); dev_seed picks which
        dev_seed: int = 0

        def __post_init__(self):
            if self.grading_timeout <= 0:
                raise ValueError("grading_timeout must be > 0 seconds")
            if self.num_dev < 0:
                raise ValueError("num_dev must be >= 0")

    def problems(self, split: str) -> list[dict]:
        self.check_split(split)
        c = self.config
        return [dict(p) for p in _splits(c.source, c.hub_config, tuple(sorted(c.hub_splits.items())),
                                         self.test_file, c.num_dev, c.dev_seed)[split]]

    def prompt(self, problem: dict, hint: bool = False) -> Prompt:
        shots = [(s["question"], s["solution"]) for s in self._shots()] if self.config.prompt_format == "fewshot" else []
        return chat_prompt(INSTRUCTION, problem["question"], shots, HINT.format(answer=problem["answer"]) if hint else None)

    def _shots(self) -> list[dict]:
        # Short solutions only: a 2k-token context holds four of them plus the problem.
        short = [p for p in self.problems("train") if len(p["solution"]) < 400 and p["answer"]]
        return short[: self.config.num_shots]

    def grade(self, problem: dict, completion: str) -> Grade:
        gold = self._parse_gold(problem["answer"])
        boxed = last_boxed(completion)
        strict_answer = _canonical(boxed) if boxed is not None else None
        strict = bool(gold) and boxed is not None and self._verify(gold, self._parse(f"\\boxed{{{boxed}}}"))
        flexible_parsed = self._parse(completion)
        flexible = bool(gold) and self._verify(gold, flexible_parsed)
        flexible_answer = _as_text(flexible_parsed)
        return Grade(strict, flexible, strict_answer, flexible_answer)

    def reference_solution(self, problem: dict) -> str | None:
        return problem.get("solution")

    # -- Math-Verify, each call under the grading timeout ------------------------------------------------------
    def _parse_gold(self, answer: str) -> list:
        if not answer:
            return []
        # A problem's samples share its gold answer: parse it once (a third of a verdict's Math-Verify time).
        cache = self.__dict__.setdefault("_gold_parsed", {})
        if answer not in cache:
            # Gold answers are bare LaTeX ("\frac{1}{2}", "(3,\frac{\pi}{2})"): box them so the LaTeX extractor
            # reads the whole answer rather than its first number.
            cache[answer] = self._parse(f"\\boxed{{{answer}}}")
        return cache[answer]

    def _parse(self, text: str) -> list:
        from math_verify import parse

        try:
            return call_with_timeout(self.config.grading_timeout, parse, text, parsing_timeout=None)
        except TimedOut:
            log.warning("MATH grading: parsing timed out after %ss", self.config.grading_timeout)
            return []

    def _verify(self, gold: list, pred: list) -> bool:
        from math_verify import verify

        if not gold or not pred:
            return False
        try:
            return bool(call_with_timeout(self.config.grading_timeout, verify, gold, pred, timeout_seconds=None))
        except TimedOut:
            log.warning("MATH grading: comparison timed out after %ss", self.config.grading_timeout)
            return False


@TASKS.register("math500")
class MATH500(MathTask):
    test_file = "test.jsonl"


@TASKS.register("math")
class MATH(MathTask):
    test_file = "test_full.jsonl"


def _canonical(latex: str) -> str:
    """A light LaTeX normalisation (\\dfrac → \\frac, \\left/\\right, units, spaces) so equal answers written
    alike vote together in majority votes; grading itself compares with Math-Verify, not with this string."""
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig, normalize_latex

    config = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True,
                                 boxed="all", equations=False)
    try:
        return call_with_timeout(2.0, normalize_latex, latex, config).strip()
    except Exception:  # noqa: BLE001 - TimedOut included; a canonical form is a convenience; fall back to the raw text
        return latex.strip()


def _as_text(parsed: list) -> str | None:
    """The text Math-Verify extracted (its fallback string), else the parsed expression printed."""
    if not parsed:
        return None
    text = next((p for p in parsed if isinstance(p, str)), None)
    return text if text is not None else str(parsed[0])


def _subject_level(row: dict) -> tuple[str | None, int | None]:
    subject = row.get("subject", row.get("type"))
    level = row.get("level")
    if isinstance(level, str):  # "Level 3"; "Level ?" in two original train files
        digits = re.findall(r"\d+", level)
        level = int(digits[0]) if digits else None
    return subject, level


def _problem(row: dict, split: str, index: int) -> dict:
    answer = row.get("answer")
    if answer is None:
        answer = last_boxed(row["solution"]) or ""
    unique_id = row.get("unique_id") or f"{split}/{index:05d}"
    subject, level = _subject_level(row)
    return {"problem_id": "math-" + unique_id.removesuffix(".json"), "question": row["problem"],
            "answer": str(answer).strip(), "solution": row.get("solution", ""), "subject": subject, "level": level,
            "unique_id": unique_id}


def _read(source: str, hub_config: str | None, hub_splits: dict, filename: str, split: str) -> list[dict]:
    if source == "seeds":
        text = (SEEDS / filename).read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    from datasets import load_dataset

    return load_dataset(source, hub_config, split=hub_splits[split]).to_list()


@lru_cache(maxsize=8)
def _splits(source: str, hub_config: str | None, hub_splits: tuple, test_file: str, num_dev: int,
            dev_seed: int) -> dict[str, tuple[dict, ...]]:
    """train, dev and test: test as published; train without test's questions, then dev carved out of it."""
    splits = dict(hub_splits)
    test = [_problem(r, "test", i) for i, r in enumerate(_read(source, hub_config, splits, test_file, "test"))]
    train = [_problem(r, "train", i)
             for i, r in enumerate(_read(source, hub_config, splits, "train_reconstructed.jsonl", "train"))]
    what = f"MATH {source} train (test: {test_file if source == 'seeds' else splits['test']})"
    train, dev = carve(drop_seen(train, {"test": test}, same_text, what), num_dev, dev_seed, same_text, what)
    return {"train": tuple(train), "dev": tuple(dev), "test": tuple(test)}
