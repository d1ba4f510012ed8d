"""The task interface. A task owns its data, its prompts, its answer extraction and its grading.

Nothing outside a task parses answers: critics and evaluation call `grade`.

Problem rows (plain dicts, stored as dataset rows) always carry:
- `problem_id`: stable across runs (derived from the source, never from a position in a shuffled list);
- `question`: the problem text;
- `answer`: the gold final answer as a string (`""` when the task has no gold answers);
plus the task's own columns (digits, subject, level, reference solution, ...).

Splits: every shipped task has `train`, `test` and `dev`, disjoint under the task's `canonical` form (two
problems with the same canonical form are the same problem: a model trained on one has seen the other). `dev`
is where choices are made (prompts, temperatures, thresholds, learning rates, round counts); `test` is only
reported. tests/test_splits.py checks every registered task.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import Prompt


@dataclass
class Grade:
    """A completion judged against the gold answer.

    `strict` requires the task's answer format ("The answer is N."); `flexible` accepts the last answer-like
    span anywhere (lm-evaluation-harness reports both for GSM8K). `correct` is the one a method acts on.
    """

    strict: bool | None  # None (both): no gold answer to judge against; the answers are still read
    flexible: bool | None
    strict_answer: str | None
    flexible_answer: str | None

    @property
    def correct(self) -> bool:
        return self.strict

    @property
    def answer(self) -> str | None:
        """The answer a completion commits to (for majority votes): the strict one, else the flexible one."""
        return self.strict_answer if self.strict_answer is not None else self.flexible_answer


def chat_prompt(instruction: str, question: str, shots: list[tuple[str, str]] = (), hint: str | None = None) -> Prompt:
    """`instruction` + `question` as the last user turn (plus `hint` when given), after `shots` as earlier
    (question, worked solution) turns: the prompt shape every built-in task uses."""
    messages = []
    for shot_question, solution in shots:
        messages.append({"role": "user", "content": f"{instruction}\n\n{shot_question}"})
        messages.append({"role": "assistant", "content": solution})
    user = f"{instruction}\n\n{question}" + (f"\n\n{hint}" if hint else "")
    messages.append({"role": "user", "content": user})
    return messages


def same_text(problem: dict) -> str:
    """A problem's question with runs of whitespace collapsed: `Task.canonical`'s default."""
    return " ".join(problem["question"].split())


class Task:
    """Base class: subclasses set `Config` (a dataclass) and implement the methods below."""

    splits: tuple[str, ...] = ("train", "test")  # the shipped tasks add "dev"
    breakdown: tuple[str, ...] = ()  # problem columns the evaluate stage breaks accuracy down by, by default

    def __init__(self, config):
        self.config = config

    @classmethod
    def available_splits(cls, config) -> tuple[str, ...]:
        """The splits a task with this config has (checked against the stages' `problems.split` at load)."""
        return cls.splits

    @classmethod
    def has_gold(cls, config) -> bool:
        """Whether its problems carry gold answers (stages that need them are refused at load otherwise)."""
        return True

    def problems(self, split: str) -> list[dict]:
        """All problems of `split`, in a fixed order."""
        raise NotImplementedError

    def canonical(self, problem: dict) -> str:
        """The form under which two problems are the same one; splits must be disjoint under it.

        By default the question with runs of whitespace collapsed (an exact duplicate up to spacing); a task with
        an equivalence of its own overrides it (arithmetic: `3 + 8` is `8 + 3`)."""
        return same_text(problem)

    def prompt(self, problem: dict, hint: bool = False) -> Prompt:
        """The prompt for `problem`. With `hint`, the gold answer is shown (STaR's rationalization)."""
        raise NotImplementedError

    def grade(self, problem: dict, completion: str) -> Grade:
        raise NotImplementedError

    def reference_solution(self, problem: dict) -> str | None:
        """A gold worked solution in the format the prompt asks for, when the task has one (SFT/SPIN data)."""
        return None

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"task {type(self).__name__} has splits {', '.join(self.splits)}, not {split!r}")
