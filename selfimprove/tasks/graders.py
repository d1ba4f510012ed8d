"""Graders of the `dataset` task: how a gold answer is read and a completion judged against it, strict by the
answer format the prompt asks for, flexible by a looser reading (each grader's rules: docs/tasks.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from ..registry import GRADERS
from .base import Grade
from .math import MathTask, last_boxed
from .numeric import extract_strict, grade_number, normalize_number

_EDGES = re.compile(r"^[\s*_`\"']+|[\s*_`\"'.]+$")
_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is:?[ \t]*([^\n]*)")


class Grader:
    """Reads gold answers and grades completions against them; `Config` (optional) holds its parameters."""

    answer_format: ClassVar[str]  # the sentence the prompt ends with, naming the format strict grading reads
    gold_help: ClassVar[str] = "map columns.answer to a column of non-empty final answers"  # fix for unreadable gold
    name = ""  # as the YAML names it

    def __init__(self, config=None):
        self.config = config

    def gold(self, text: str) -> str | None:
        """The gold answer as grading compares it (`text` is non-empty), or None when it cannot be read."""
        return text

    def grade(self, completion: str, gold: str) -> Grade:
        raise NotImplementedError


@GRADERS.register("numeric")
class Numeric(Grader):
    answer_format = 'At the end, write "The answer is <number>." with the final number.'
    gold_help = ("it needs a number (or text ending in '#### N' or 'The answer is N'): map columns.answer to the "
                 "final-answer column, or choose grader: exact or math_verify")

    def gold(self, text: str) -> str | None:
        return normalize_number(text) or extract_strict(text)

    def grade(self, completion: str, gold: str) -> Grade:
        return grade_number(completion, gold)


@GRADERS.register("math_verify")
class MathVerify(Grader):
    answer_format = "Put your final answer within \\boxed{}."

    @dataclass
    class Config:
        grading_timeout: float = 5.0  # seconds per Math-Verify parse or comparison

        def __post_init__(self):
            if self.grading_timeout <= 0:
                raise ValueError("grading_timeout must be > 0 seconds")

    def __init__(self, config):
        super().__init__(config)
        # MATH's grading as it is, Math-Verify calls and time limit included: it reads only the gold `answer`.
        self._math = MathTask(MathTask.Config(grading_timeout=config.grading_timeout))

    def gold(self, text: str) -> str | None:
        return (last_boxed(text) or text).strip() or None

    def grade(self, completion: str, gold: str) -> Grade:
        return self._math.grade({"answer": gold}, completion)


@GRADERS.register("exact")
class Exact(Grader):
    answer_format = 'End with "The answer is <answer>."'

    def grade(self, completion: str, gold: str) -> Grade:
        # strict: the rest of the line after the last "The answer is" (the format the prompt asks for)
        matches = _ANSWER_IS.findall(completion)
        strict = normalize_text(matches[-1]) if matches and matches[-1].strip() else None
        # flexible: the last non-empty line, after its last "answer is" or "answer:" when it has one
        lines = [line for line in completion.splitlines() if line.strip()]
        flexible = normalize_text(re.split(r"answer(?: is|:)", lines[-1], flags=re.IGNORECASE)[-1]) if lines else None
        gold = normalize_text(gold)
        return Grade(strict == gold, bool(flexible) and flexible == gold, strict, flexible or None)


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no surrounding quotes, bold or backticks, no final period: "**Paris**." → "paris".

    Idempotent, so an extracted answer put in place of the gold (majority votes) compares as the gold does."""
    text = " ".join(str(text).split()).casefold()
    return _EDGES.sub("", text)
