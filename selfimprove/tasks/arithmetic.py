"""n-digit addition with a scratchpad rationale: the testbed on which a small model can visibly improve.

In the spirit of STaR's own arithmetic experiment (Zelikman et al., 2022, §4.1: n-digit sums with a
scratchpad, difficulty by digit count). Problems are generated from a seed; per digit count the test set is
drawn first, then the few-shot exemplars, then the train set, each excluding what came before, so the splits
are disjoint. Both operands of an n-digit problem have exactly n digits (1-digit problems use 0-9).

Prompt formats:
- `chat` (default): an instruction to add digit by digit and end with "The answer is <number>."; the model
  writes its own rationale. The embedded SmolLM2-135M gets 30% / 7% / 0% of 1 / 2 / 3-digit sums right greedily
  and 57% / 13% / 0% within 4 samples (90 test problems), so STaR has correct samples to learn from.
- `fewshot`: three worked column-by-column scratchpads as earlier turns:

      7 + 5 = 12, write 2, carry 1.
      4 + 8 + 1 = 13, write 3, carry 1.
      The carry 1 is the leading digit.
      The answer is 132.

  Closer to the paper's scratchpad, but the 135M model copies the exemplars' digits (2% greedy on 1 digit).
The gold scratchpad is every problem's `solution` (reference rationale for SFT/SPIN).

Deviation from the paper: STaR's scratchpad is a compact symbolic trace for a model fine-tuned on it; ours is
worded for an instruct model, and by default the model's own wording is what STaR reinforces.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from ..records import Prompt
from ..registry import TASKS
from .base import Grade, Task, chat_prompt
from .numeric import extract_flexible, extract_strict, same_number

INSTRUCTION = (
    "Add the two numbers digit by digit, from right to left, keeping track of the carry. "
    'End with "The answer is <number>."'
)
HINT = "(The correct answer is {answer}. Show the digit-by-digit steps that reach it.)"


def scratchpad(a: int, b: int) -> str:
    """The gold rationale for a + b."""
    xs, ys = str(a)[::-1], str(b)[::-1]
    lines, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x, y = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
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
        digits: list[int] = field(default_factory=lambda: [1, 2, 3])  # difficulty mix, equal shares
        num_train: int = 6000
        num_test: int = 150  # 50 per digit count by default: there are only 100 one-digit sums
        seed: int = 1234  # problem generation; independent of the run seed
        prompt_format: Literal["chat", "fewshot"] = "chat"
        num_shots: int = 3

        def __post_init__(self):
            if not self.digits or any(d < 1 or d > 12 for d in self.digits):
                raise ValueError(f"digits must be a non-empty list of integers in 1..12, got {self.digits}")
            if len(set(self.digits)) != len(self.digits):
                raise ValueError(f"digits must not repeat, got {self.digits}")
            if min(self.num_train, self.num_test, self.num_shots) < 0:
                raise ValueError("num_train, num_test and num_shots must be >= 0")
            _check_capacity(self.digits, self.num_train, self.num_test, self.num_shots)

    splits = ("train", "test", "shots")
    breakdown = ("digits",)

    def problems(self, split: str) -> list[dict]:
        self.check_split(split)
        c = self.config
        return [dict(p) for p in _generate(tuple(c.digits), c.num_train, c.num_test, c.num_shots, c.seed)[split]]

    def prompt(self, problem: dict, hint: bool = False) -> Prompt:
        shots = [(f"What is {s['question']}?", s["solution"]) for s in self.problems("shots")] \
            if self.config.prompt_format == "fewshot" else []
        return chat_prompt(INSTRUCTION, f"What is {problem['question']}?", shots,
                           HINT.format(answer=problem["answer"]) if hint else None)

    def grade(self, problem: dict, completion: str) -> Grade:
        strict, flexible = extract_strict(completion), extract_flexible(completion)
        gold = problem["answer"]
        return Grade(same_number(strict, gold), same_number(flexible, gold), strict, flexible)

    def reference_solution(self, problem: dict) -> str | None:
        return problem["solution"]


def _capacity(digits: int) -> int:
    return 100 if digits == 1 else (9 * 10 ** (digits - 1)) ** 2


def _check_capacity(digits: list[int], num_train: int, num_test: int, num_shots: int) -> None:
    """Refuse, at config load, split sizes the digit counts cannot fill with distinct problems.

    Each digit count gets an equal share of every split. A test or few-shot share larger than its digit count's
    pool could only be met by repeating problems, so it is refused here rather than mid-run. A train share that
    does not fit is capped (`_generate`: the mix shifts toward longer problems), but digit counts that hold fewer
    distinct problems in all than num_train + num_test + num_shots are refused: nothing longer can take up the
    slack, and the run would silently train on far fewer problems than it asked for.
    """
    shares = zip(digits, _shares(num_test, len(digits)), _shares(num_shots, len(digits)))
    for d, test, shots in shares:
        if test + shots > _capacity(d):
            raise ValueError(
                f"digits: {d}-digit addition has only {_capacity(d)} distinct problems, but num_test={num_test} "
                f"and num_shots={num_shots} give it {test} test and {shots} few-shot problems (each of the "
                f"{len(digits)} digit counts gets an equal share); lower num_test or add digit counts to share it"
            )
    total = sum(_capacity(d) for d in digits)
    wanted = num_train + num_test + num_shots
    if wanted > total:
        left = total - num_test - num_shots
        raise ValueError(
            f"digits: {digits} allow only {total} distinct problems, fewer than num_train + num_test + num_shots "
            f"= {num_train} + {num_test} + {num_shots} = {wanted}; lower num_train to at most {left} or add "
            f"longer digit counts (e.g. digits: {sorted(set(digits) | {max(digits) + 1})})"
        )


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randrange(10) if digits == 1 else rng.randrange(10 ** (digits - 1), 10 ** digits)


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@lru_cache(maxsize=8)
def _generate(digits: tuple[int, ...], num_train: int, num_test: int, num_shots: int, seed: int) -> dict:
    """Per digit count: test first, then few-shot exemplars, then train, each excluding all drawn before.

    Small digit counts have few distinct problems (100 one-digit sums): their train share is capped by what is
    left after the test set, so the mix shifts toward longer problems rather than repeating or leaking.
    """
    rng = random.Random(seed)
    per_digit: dict[int, dict[str, list[tuple[int, int]]]] = {}
    wanted = {"test": _shares(num_test, len(digits)), "shots": _shares(num_shots, len(digits)),
              "train": _shares(num_train, len(digits))}
    for k, d in enumerate(digits):
        seen: set[tuple[int, int]] = set()
        per_digit[d] = {}
        for split in ("test", "shots", "train"):
            count = min(wanted[split][k], _capacity(d) - len(seen))  # only train is ever capped (_check_capacity)
            pairs = []
            if _capacity(d) <= 10_000:  # small pools: shuffle the whole pool, draw without rejection
                pool = [p for p in ((a, b) for a in range(10 ** (d - 1) if d > 1 else 0, 10 ** d)
                                    for b in range(10 ** (d - 1) if d > 1 else 0, 10 ** d)) if p not in seen]
                rng.shuffle(pool)
                pairs = pool[:count]
            else:
                while len(pairs) < count:
                    pair = (_operand(rng, d), _operand(rng, d))
                    if pair not in seen and pair not in pairs:
                        pairs.append(pair)
            seen.update(pairs)
            per_digit[d][split] = pairs
    out = {}
    for split in ("test", "shots", "train"):
        # Interleave digit counts so any prefix of a split has the same difficulty mix.
        columns = [[(d, a, b) for a, b in per_digit[d][split]] for d in digits]
        ordered = [col[i] for i in range(max(map(len, columns), default=0)) for col in columns if i < len(col)]
        out[split] = tuple(
            {"problem_id": f"add-{split}-{i:05d}", "question": f"{a} + {b}", "answer": str(a + b),
             "digits": d, "solution": scratchpad(a, b)}
            for i, (d, a, b) in enumerate(ordered)
        )
    return out
