"""A user's own task, named by dotted path in test pipelines (`task: {name: "tests.task_plugins:WordLength"}`):
the plugin mechanism under test, written as a researcher outside the package would write it."""

from __future__ import annotations

from dataclasses import dataclass, field

from selfimprove.tasks import Grade, Task
from selfimprove.tasks.base import chat_prompt
from selfimprove.tasks.graders import Grader
from selfimprove.tasks.numeric import extract_flexible, extract_strict, same_number

INSTRUCTION = 'Count the letters of the word. End with "The answer is <number>."'


class WordLength(Task):
    """How many letters has a word? The last `num_test` words are the test split, the others train."""

    @dataclass
    class Config:
        words: list[str] = field(default_factory=lambda: ["apple", "river", "stone", "moon", "sky"])
        num_test: int = 2

        def __post_init__(self):
            if not 0 < self.num_test < len(self.words):
                raise ValueError(f"num_test must be in 1..{len(self.words) - 1} (one word at least for train), "
                                 f"got {self.num_test}")

    def problems(self, split: str) -> list[dict]:
        self.check_split(split)
        cut = len(self.config.words) - self.config.num_test
        words = self.config.words[cut:] if split == "test" else self.config.words[:cut]
        return [{"problem_id": f"len-{w}", "question": w, "answer": str(len(w))} for w in words]

    def prompt(self, problem: dict, hint: bool = False):
        return chat_prompt(INSTRUCTION, problem["question"], (), f"(It has {problem['answer']}.)" if hint else None)

    def grade(self, problem: dict, completion: str) -> Grade:
        strict, flexible = extract_strict(completion), extract_flexible(completion)
        return Grade(same_number(strict, problem["answer"]), same_number(flexible, problem["answer"]), strict, flexible)


class Roman(Grader):
    """A user's grader for the `dataset` task (`grader: "tests.task_plugins:Roman"`): gold answers are Roman
    numerals, a completion's answer is its last word, compared as numbers."""

    answer_format = "End with the answer as a Roman numeral."
    gold_help = "gold answers must be Roman numerals such as XIV"
    VALUES = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}

    def gold(self, text: str) -> str | None:
        return text.upper() if set(text.upper()) <= set(self.VALUES) else None

    def grade(self, completion: str, gold: str) -> Grade:
        words = completion.replace(".", " ").split()
        answer = self.gold(words[-1]) if words else None
        same = answer is not None and _roman(answer) == _roman(gold)
        return Grade(same, same, answer, answer)


def _roman(text: str) -> int:
    values = [Roman.VALUES[c] for c in text]
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))
