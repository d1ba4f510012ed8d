"""A user's own task, named by dotted path in test pipelines (`task: {name: "tests.task_plugins:WordLength"}`):
the plugin mechanism under test, written as a researcher outside the package would write it."""

from __future__ import annotations

from dataclasses import dataclass, field

from selfimprove.tasks import Grade, Task
from selfimprove.tasks.base import chat_prompt
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
