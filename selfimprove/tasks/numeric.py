"""Numeric answer extraction shared by the tasks whose answers are numbers (GSM8K, arithmetic).

Strict: the number after "The answer is" (or GSM8K's own "#### N"), the last such statement winning (or the
first, as lm-evaluation-harness does, with `pick="first"`).
Flexible: the last number anywhere in the completion. Both normalise thousands commas, a leading `$`,
signs, trailing periods and decimals ("1,080" == "1080", "12.50" == "12.5", "-3" == "-3.0").
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from .base import Grade

# A number: optional sign, digits with optional thousands commas, optional decimals; or a bare decimal (".5").
_NUMBER = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\.\d+"
STRICT_PATTERNS = (
    re.compile(r"[Tt]he (?:final )?answer is[:\s]*\**\s*(" + _NUMBER + r")"),
    re.compile(r"####\s*(" + _NUMBER + r")"),
)
FLEXIBLE_PATTERN = re.compile(_NUMBER)


def normalize_number(text: str | None) -> str | None:
    """Canonical string of a number ("1,080.00" → "1080"), or None if `text` is not one."""
    if text is None:
        return None
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return format(value.to_integral_value() if value == value.to_integral_value() else value.normalize(), "f")


def extract_strict(completion: str, pick: str = "last") -> str | None:
    """The number of the last answer statement (the model's final commitment) or, as lm-evaluation-harness's GSM8K
    strict-match takes it, the first."""
    matches = sorted((m.start(), m.group(1)) for pattern in STRICT_PATTERNS for m in pattern.finditer(completion))
    return normalize_number(matches[-1 if pick == "last" else 0][1]) if matches else None


def extract_flexible(completion: str) -> str | None:
    matches = FLEXIBLE_PATTERN.findall(completion)
    return normalize_number(matches[-1]) if matches else None


def same_number(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Decimal(a) == Decimal(b)


def grade_number(completion: str, gold: str, pick: str = "last") -> Grade:
    """`completion` graded against the numeric `gold` answer, strict and flexible."""
    strict, flexible = extract_strict(completion, pick), extract_flexible(completion)
    return Grade(same_number(strict, gold), same_number(flexible, gold), strict, flexible)
