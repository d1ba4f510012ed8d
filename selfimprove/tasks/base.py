"""The task interface. A task owns its data, its prompts, its answer extraction and its grading; nothing outside a
task parses answers (critics and evaluation call `grade`).

Problem rows (plain dicts, stored as dataset rows) always carry `problem_id` (stable across runs: derived from the
source, never from a position in a shuffled list), `question` and `answer` (the gold final answer as a string,
`""` without gold), plus the task's own columns. Splits are as the README's *Tasks* says: disjoint under
`canonical`, `dev` for choices, `test` only reported; tests/test_splits.py checks every registered task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from ..records import Prompt
from ..shipped import root
from .overlap import carve, drop_seen


@dataclass
class Grade:
    """A completion judged against the gold answer: `strict` requires the task's answer format ("The answer is
    N."), `flexible` accepts the last answer-like span anywhere (lm-evaluation-harness reports both for GSM8K);
    `correct` is the one a method acts on."""

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


TEXT_STOP = "\nQuestion:"  # where a base model, having answered, goes on to write the next question


def text_prompt(instruction: str, question: str, shots: list[tuple[str, str]] = (), hint: str | None = None) -> str:
    """The content of `chat_prompt` as plain text, for a model that has no chat template or cannot follow one (a
    base model): `instruction` once, each shot as "Question: ...\nAnswer:\n<solution>", then the question
    (and `hint`) ending in "Answer:\n", so the model writes the solution on the next line. A base model that has
    answered goes on to the next "Question:", so generation stops at `TEXT_STOP` (`Task.stop`)."""
    blocks = [instruction, *(f"Question: {q}\nAnswer:\n{solution}" for q, solution in shots)]
    blocks.append(f"Question: {question}" + (f"\n{hint}" if hint else "") + "\nAnswer:\n")
    return "\n\n".join(blocks)


def format_prompt(prompt_format: str, instruction: str, question: str, shots: list[tuple[str, str]],
                  hint: str | None) -> Prompt:
    """A task's prompt in its `prompt_format`: `chat` (no shots), `fewshot` (shots as earlier chat turns) or
    `text` (`text_prompt`, with the shots)."""
    if prompt_format == "text":
        return text_prompt(instruction, question, shots, hint)
    return chat_prompt(instruction, question, shots if prompt_format == "fewshot" else (), hint)


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
        """The form under which two problems are the same one; splits must be disjoint under it. A task with an
        equivalence of its own overrides it (arithmetic: `3 + 8` is `8 + 3`)."""
        return same_text(problem)

    def prompt(self, problem: dict, hint: bool = False) -> Prompt:
        """The prompt for `problem`. With `hint`, the gold answer is shown (STaR's rationalization)."""
        raise NotImplementedError

    def grade(self, problem: dict, completion: str) -> Grade:
        raise NotImplementedError

    def stop(self) -> tuple[str, ...]:
        """Strings that end a completion wherever it is sampled from this task's prompts (added to every
        sampling's `stop`): `TEXT_STOP` for the `text` prompt format, none for chat prompts (the chat template's
        end-of-turn token ends them)."""
        return (TEXT_STOP,) if getattr(self.config, "prompt_format", None) == "text" else ()

    def reference_solution(self, problem: dict) -> str | None:
        """A gold worked solution in the format the prompt asks for, when the task has one (SFT/SPIN data)."""
        return None

    def steps(self, completion: str) -> list[str]:
        """The steps of a response, in order: what process rewards label and score one by one. By default its
        non-empty lines (stripped), which is how the shipped tasks' worked solutions are laid out."""
        return [line.strip() for line in completion.splitlines() if line.strip()]

    def step_verdicts(self, problem: dict, completion: str) -> list[bool] | None:
        """Per step of `completion` (as `steps` splits it), whether that step alone is right, where the task can
        check steps exactly (arithmetic); None where it cannot (the default). A prefix is right when all its
        steps are (`prefix_verdicts`)."""
        return None

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"task {type(self).__name__} has splits {', '.join(self.splits)}, not {split!r}")


class PublishedTask(Task):
    """A published dataset (GSM8K, MATH): shipped files under `seeds/`, or a hub dataset with the same columns
    (`source: <hub dataset>`). Test is as published; train drops every problem whose question (up to spacing) is
    in test; dev is then a seeded slice of train (`num_dev`, `dev_seed`) and train the rest.

    Subclasses set the class attributes below and two classmethods: `problem(row, split, index, source)`, a data
    row as a problem, and `describe(source, hub_splits)`, the train set as errors and logs name it."""

    splits = ("train", "test", "dev")
    seeds: str  # the folder under seeds/
    seed_files: dict[str, str]  # train/test → its file in that folder
    instruction: str  # the user turn's first paragraph
    hint_template: str  # STaR's rationalization hint; {answer} is the gold answer

    @dataclass
    class Config:
        source: str = "seeds"  # "seeds" (shipped files) or a hub dataset name, e.g. "openai/gsm8k"
        hub_config: str | None = None
        hub_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "test": "test"})  # ours → hub's
        prompt_format: Literal["chat", "fewshot", "text"] = "chat"  # format_prompt says what each is
        num_shots: int = 4  # fewshot and text: worked train solutions shown before the question
        num_dev: int = 500  # held out of train for choices (prompt, temperature, ...); dev_seed picks which
        dev_seed: int = 0

        def __post_init__(self):
            if self.num_dev < 0:
                raise ValueError("num_dev must be >= 0")

    def problems(self, split: str) -> list[dict]:
        self.check_split(split)
        c = self.config
        hub_splits = tuple(sorted(c.hub_splits.items()))  # hashable: _published caches by its arguments
        problems = _published(type(self), c.source, c.hub_config, hub_splits, c.num_dev, c.dev_seed)[split]
        return [dict(p) for p in problems]

    def prompt(self, problem: dict, hint: bool = False) -> Prompt:
        shots = [(s["question"], s["solution"]) for s in self.shots()] if self.config.prompt_format != "chat" else []
        return format_prompt(self.config.prompt_format, self.instruction, problem["question"], shots,
                             self.hint_template.format(answer=problem["answer"]) if hint else None)

    def shots(self) -> list[dict]:
        """The worked train problems a few-shot prompt shows."""
        return self.problems("train")[: self.config.num_shots]

    def reference_solution(self, problem: dict) -> str | None:
        return problem.get("solution")


@lru_cache(maxsize=8)
def _published(cls, source: str, hub_config: str | None, hub_splits: tuple, num_dev: int,
               dev_seed: int) -> dict[str, tuple[dict, ...]]:
    """train, dev and test: test as published; train without test's questions, then dev carved out of it."""
    loaded = {}
    for split in ("test", "train"):
        if source == "seeds":
            text = (root() / "seeds" / cls.seeds / cls.seed_files[split]).read_text()
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            from datasets import load_dataset

            rows = load_dataset(source, hub_config, split=dict(hub_splits)[split]).to_list()
        loaded[split] = [cls.problem(row, split, i, source) for i, row in enumerate(rows)]
    what = cls.describe(source, dict(hub_splits))
    train, dev = carve(drop_seen(loaded["train"], {"test": loaded["test"]}, same_text, what), num_dev, dev_seed,
                       same_text, what)
    return {"train": tuple(train), "dev": tuple(dev), "test": tuple(loaded["test"])}
