"""MATH (Hendrycks et al., 2021): competition problems with LaTeX answers, graded with Math-Verify.

`math500` tests on MATH500 (PRM800K's 500-problem test split), `math` on the full 5,000; both train on PRM800K's
train split rebuilt, minus the task's test problems (docs/tasks.md). Grading, the only place MATH answers are
parsed, is as the README's *Tasks* says: strict = the last `\\boxed{...}` (brace-matched), flexible = Math-Verify's
own extraction, each verified by Math-Verify under `grading_timeout` (selfimprove.timeouts), past which a
pathological expression counts as no answer / not equal instead of stalling the run.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from ..registry import TASKS
from ..timeouts import TimedOut, call_with_timeout
from .base import Grade, PublishedTask

INSTRUCTION = "Solve the following math problem step by step. Put your final answer within \\boxed{}."

log = logging.getLogger(__name__)

# Math-Verify warns once that its signal timeouts are off: we turn them off on purpose (see timeouts.py).
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())


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


class MathTask(PublishedTask):
    """Shared by `math500` and `math`; subclasses set the test file."""

    seeds = "math"
    instruction = INSTRUCTION
    hint_template = ("(The correct answer is ${answer}$. Explain step by step how to reach it, and put it within "
                     "\\boxed{{}}, without mentioning that you were told.)")
    breakdown = ("subject", "level")  # the evaluate stage's default accuracy breakdowns

    @dataclass
    class Config(PublishedTask.Config):
        grading_timeout: float = 5.0  # seconds per Math-Verify parse or comparison

        def __post_init__(self):
            if self.grading_timeout <= 0:
                raise ValueError("grading_timeout must be > 0 seconds")
            super().__post_init__()

    def shots(self) -> list[dict]:
        # Short solutions only: a 2k-token context holds four of them plus the problem.
        short = [p for p in self.problems("train") if len(p["solution"]) < 400 and p["answer"]]
        return short[: self.config.num_shots]

    def grade(self, problem: dict, completion: str) -> Grade:
        gold = self._parse_gold(problem["answer"])
        boxed = last_boxed(completion)
        strict_answer = _canonical(boxed) if boxed is not None else None
        strict = bool(gold) and boxed is not None and self._verify(gold, self._parse(f"\\boxed{{{boxed}}}"))
        flexible = self._parse(completion)
        return Grade(strict, self._verify(gold, flexible), strict_answer, _as_text(flexible))

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

        return self._timed("parsing", parse, text, parsing_timeout=None) or []

    def _verify(self, gold: list, pred: list) -> bool:
        from math_verify import verify

        return bool(gold and pred and self._timed("comparison", verify, gold, pred, timeout_seconds=None))

    def _timed(self, what: str, fn, *args, **kwargs):
        try:
            return call_with_timeout(self.config.grading_timeout, fn, *args, **kwargs)
        except TimedOut:  # counts as no answer / not equal
            log.warning("MATH grading: %s timed out after %ss", what, self.config.grading_timeout)
            return None

    @classmethod
    def problem(cls, row: dict, split: str, index: int, source: str) -> dict:
        answer = row.get("answer")
        if answer is None:
            answer = last_boxed(row["solution"]) or ""
        unique_id = row.get("unique_id") or f"{split}/{index:05d}"
        level = row.get("level")
        if isinstance(level, str):  # "Level 3"; "Level ?" in two original train files
            digits = re.findall(r"\d+", level)
            level = int(digits[0]) if digits else None
        return {"problem_id": "math-" + unique_id.removesuffix(".json"), "question": row["problem"],
                "answer": str(answer).strip(), "solution": row.get("solution", ""),
                "subject": row.get("subject", row.get("type")), "level": level, "unique_id": unique_id}

    @classmethod
    def describe(cls, source: str, hub_splits: dict[str, str]) -> str:
        return f"MATH {source} train (test: {cls.seed_files['test'] if source == 'seeds' else hub_splits['test']})"


@TASKS.register("math500")
class MATH500(MathTask):
    seed_files = {"train": "train_reconstructed.jsonl", "test": "test.jsonl"}


@TASKS.register("math")
class MATH(MathTask):
    seed_files = {"train": "train_reconstructed.jsonl", "test": "test_full.jsonl"}


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
    return next((p for p in parsed if isinstance(p, str)), str(parsed[0])) if parsed else None
