"""n-digit addition with a scratchpad rationale: the testbed on which a small model can visibly improve.

In the spirit of STaR's own arithmetic experiment (Zelikman et al., 2022, §4.1: n-digit sums with a scratchpad,
difficulty by digit count). Problems are generated from a seed; both operands of an n-digit problem have exactly
n digits (1-digit problems use 0-9). Splits are disjoint up to the order of the operands (`canonical`): per digit
count the generator draws unordered operand pairs, test first, then dev, the few-shot exemplars and train, each
excluding every pair drawn before, and shows each pair in a random order.

Default difficulty mix: 2- and 3-digit sums. Up to order there are only 55 one-digit sums: not the 75 test
problems an equal share of 150 would give them, and even 50 (the old default's share) would leave 5 for dev,
exemplars and train together. Mixes with 1 digit are accepted when their split sizes fit (`digits: [1, 2, 3]`
with small `num_test` and `num_dev`; `_check_capacity` refuses sizes that do not).

Prompt formats: `chat` (default), an instruction to add digit by digit and end with "The answer is <number>.",
the model writing its own rationale (chosen by its accuracy on what was then the test split, before dev splits
existed: docs/results.md marks the figures that need a rerun; choices are now made on `dev`); `fewshot`, three
worked column-by-column scratchpads (`scratchpad`, every problem's `solution`: the reference rationale for
SFT/SPIN) as earlier turns, closer to the paper's (the embedded 135M model tends to copy the exemplars' digits);
`text`, the same exemplars as plain "Question: ... Answer: ..." text with no chat template, for a base model that
cannot follow or end a chat turn (sampling stops at the next "Question:").

Deviation from the paper: STaR's scratchpad is a compact symbolic trace for a model fine-tuned on it; ours is
worded for an instruct model, and by default the model's own wording is what STaR reinforces.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from ..records import Prompt
from ..registry import TASKS
from .base import Grade, Task, format_prompt
from .numeric import grade_number

INSTRUCTION = (
    "Add the two numbers digit by digit, from right to left, keeping track of the carry. "
    'End with "The answer is <number>."'
)
HINT = "(The correct answer is {answer}. Show the digit-by-digit steps that reach it.)"


def scratchpad(a: int, b: int) -> str:
    """The gold rationale for a + b, one line per column ("4 + 8 + 1 = 13, write 3, carry 1."), ending in "The
    carry 1 is the leading digit." when there is one and "The answer is <a + b>."."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for x, y in itertools.zip_longest(map(int, xs), map(int, ys), fillvalue=0):
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        carry_text = f", carry {total // 10}" if total >= 10 else ""
        lines.append(f"{terms} = {total}, write {total % 10}{carry_text}.")
        carry = total // 10
    if carry:
        lines.append(f"The carry {carry} is the leading digit.")
    lines.append(f"The answer is {a + b}.")
    return "\n".join(lines)


@TASKS.register("arithmetic")
class Arithmetic(Task):
    @dataclass
    class Config:
        # Difficulty mix, equal shares per split. No 1-digit sums by default: the module docstring says why.
        digits: list[int] = field(default_factory=lambda: [2, 3])
        num_train: int = 6000
        num_test: int = 150
        num_dev: int = 150  # held out for choosing prompts, temperatures, thresholds, rounds: never tuned on test
        seed: int = 1234  # problem generation; independent of the run seed
        prompt_format: Literal["chat", "fewshot", "text"] = "chat"  # the module docstring says what each is
        num_shots: int = 3

        def __post_init__(self):
            if not self.digits or any(d < 1 or d > 12 for d in self.digits):
                raise ValueError(f"digits must be a non-empty list of integers in 1..12, got {self.digits}")
            if len(set(self.digits)) != len(self.digits):
                raise ValueError(f"digits must not repeat, got {self.digits}")
            if min(self.num_train, self.num_test, self.num_dev, self.num_shots) < 0:
                raise ValueError("num_train, num_test, num_dev and num_shots must be >= 0")
            _check_capacity(self.digits, self.split_sizes())

        def split_sizes(self) -> dict[str, int]:
            """Split → size (field num_<split>), in the order the generator draws them (each excluding the last)."""
            return {split: getattr(self, f"num_{split}") for split in ("test", "dev", "shots", "train")}

    splits = ("train", "test", "dev", "shots")
    breakdown = ("digits",)

    def problems(self, split: str) -> list[dict]:
        self.check_split(split)
        c = self.config
        return [dict(p) for p in _generate(tuple(c.digits), tuple(c.split_sizes().items()), c.seed)[split]]

    def canonical(self, problem: dict) -> str:
        """`a + b` with the smaller operand first: commuted sums are the same problem."""
        a, b = sorted(int(x) for x in problem["question"].split(" + "))
        return f"{a} + {b}"

    def prompt(self, problem: dict, hint: bool = False) -> Prompt:
        shots = [(f"What is {s['question']}?", s["solution"]) for s in self.problems("shots")] \
            if self.config.prompt_format != "chat" else []
        return format_prompt(self.config.prompt_format, INSTRUCTION, f"What is {problem['question']}?", shots,
                             HINT.format(answer=problem["answer"]) if hint else None)

    def grade(self, problem: dict, completion: str) -> Grade:
        return grade_number(completion, problem["answer"])

    def reference_solution(self, problem: dict) -> str | None:
        return problem["solution"]

    def step_verdicts(self, problem: dict, completion: str) -> list[bool]:
        """Per step (line, as `scratchpad` writes one per column), whether its digit arithmetic is right: the exact
        oracle that Monte-Carlo step labels and process reward models are measured against.

        Column k's line must read "x + y [+ c] = s, write d[, carry e]." with x, y the operands' k-th digits from
        the right (either order; 0 past the shorter operand), c the true carry into column k (the term left out or
        written "+ 0" when it is 0), s = x + y + c, d = s mod 10, and the carry written exactly when s >= 10.
        After the columns, "The carry 1 is the leading digit." is right when the last column carries 1, and "The
        answer is N." when N = a + b. Every other line (prose, an extra column, a missing one skipped) is wrong.
        The carry checked is the true one, so a wrong carry makes its own line wrong, and the next column, which
        adds it, wrong too."""
        a, b = (int(x) for x in problem["question"].split(" + "))
        xs, ys = str(a)[::-1], str(b)[::-1]
        columns = [(int(x), int(y)) for x, y in itertools.zip_longest(xs, ys, fillvalue="0")]
        verdicts, column, carry = [], 0, 0
        for step in self.steps(completion):
            m = _COLUMN.fullmatch(step)
            if m:
                x, y, c, total, digit, out = (None if g is None else int(g) for g in m.groups())
                right = (column < len(columns) and sorted((x, y)) == sorted(columns[column])
                         and (c or 0) == carry and total == x + y + carry and digit == total % 10
                         and out == (total // 10 if total >= 10 else None))
                verdicts.append(right)
                if column < len(columns):  # the true carry into the next column, whatever the line said
                    carry = (sum(columns[column]) + carry) // 10
                column += 1
                continue
            m = _LEADING.fullmatch(step)
            if m:
                verdicts.append(column == len(columns) and carry == int(m.group(1)) and carry > 0)
                continue
            m = _ANSWER.fullmatch(step)
            verdicts.append(bool(m) and int(m.group(1)) == a + b)
        return verdicts


_COLUMN = re.compile(r"(\d) \+ (\d)(?: \+ (\d))? = (\d+), write (\d)(?:, carry (\d))?\.")
_LEADING = re.compile(r"The carry (\d) is the leading digit\.")
_ANSWER = re.compile(r"The answer is (\d+)\.")


def _operands(digits: int) -> range:
    return range(10) if digits == 1 else range(10 ** (digits - 1), 10 ** digits)


def _capacity(digits: int) -> int:
    """Distinct `digits`-digit sums up to the order of the operands: unordered pairs, a pair with itself included."""
    n = len(_operands(digits))
    return n * (n + 1) // 2


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _check_capacity(digits: list[int], sizes: dict[str, int]) -> None:
    """Refuse, at config load, split sizes the digit counts cannot fill with distinct problems (up to order): a
    share that does not fit in what is left of its pool could only be met by repeating problems or by silently
    making the split smaller."""
    left = [_capacity(d) for d in digits]
    before: list[str] = []
    for split, size in sizes.items():
        shares, name = _shares(size, len(digits)), f"num_{split}"
        if any(share > room for share, room in zip(shares, left)):
            # The largest size whose equal shares fit: every part takes min(left), and the first parts one more
            # each for as long as they have room for it (_shares gives the remainder to the first parts).
            low = min(left)
            most = low * len(digits) + next(i for i, room in enumerate(left) if room == low)
            pools = ", ".join(f"{_capacity(d)} {d}-digit" for d in digits)
            raise ValueError(
                f"{name}: {size} does not fit: digits {digits} give {pools} distinct sums up to the order "
                f"of the operands, every split takes an equal share of each digit count, and after "
                f"{', '.join(before) or 'nothing'} at most {name}={most} is left; lower {name} "
                f"to at most {most}, or add longer digit counts (e.g. digits: "
                f"{sorted(set(digits) | {max(digits) + 1})})")
        left = [room - share for share, room in zip(shares, left)]
        before.append(f"{name}={size}")


@lru_cache(maxsize=8)
def _generate(digits: tuple[int, ...], sizes: tuple[tuple[str, int], ...], seed: int) -> dict:
    """Per digit count, each split in the order of `sizes`, drawn as unordered pairs excluding all drawn before."""
    rng = random.Random(seed)
    per_digit: dict[int, dict[str, list[tuple[int, int]]]] = {}
    for k, d in enumerate(digits):
        wanted = {split: _shares(size, len(digits))[k] for split, size in sizes}
        operands = _operands(d)
        if _capacity(d) <= 10_000:  # small pools: shuffle every unordered pair, deal the splits out in order
            pool = [(a, b) for a in operands for b in operands if a <= b]
            rng.shuffle(pool)
        else:  # large pools: draw with rejection until every split is full
            pool, seen = [], set()
            while len(pool) < sum(wanted.values()):
                pair = tuple(sorted((rng.choice(operands), rng.choice(operands))))
                if pair not in seen:
                    seen.add(pair)
                    pool.append(pair)
        per_digit[d], start = {}, 0
        for split, count in wanted.items():  # _check_capacity guarantees the pool holds every share
            # Shown in a random order, so that neither operand is always the smaller one.
            per_digit[d][split] = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in pool[start:start + count]]
            start += count
    out = {}
    for split, _ in sizes:
        # Interleave digit counts so any prefix of a split has the same difficulty mix.
        columns = [[(d, a, b) for a, b in per_digit[d][split]] for d in digits]
        ordered = [x for row in itertools.zip_longest(*columns) for x in row if x is not None]
        out[split] = tuple(
            {"problem_id": f"add-{split}-{i:05d}", "question": f"{a} + {b}", "answer": str(a + b),
             "digits": d, "solution": scratchpad(a, b)}
            for i, (d, a, b) in enumerate(ordered)
        )
    return out
