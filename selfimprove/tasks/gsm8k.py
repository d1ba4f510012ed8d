"""GSM8K (Cobbe et al., 2021): grade-school math word problems with integer answers, from `seeds/gsm8k/` (copied
unchanged from openai/grade-school-math, MIT) or a hub dataset (the README's *Tasks*). Gold answers follow `#### `
in the solution. Prompts ask for "The answer is <number>." (with "The answer is N." small models echo the letter
N, docs/cpu.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..registry import TASKS
from .base import Grade, PublishedTask
from .numeric import grade_number, normalize_number


def clean_solution(solution: str) -> str:
    """A GSM8K gold solution in our answer format: calculator annotations `<<...>>` removed, `#### N` replaced."""
    body, _, final = solution.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final.strip()}."


@TASKS.register("gsm8k")
class GSM8K(PublishedTask):
    seeds = "gsm8k"
    seed_files = {"train": "train.jsonl", "test": "test.jsonl"}
    instruction = ("Solve the following math problem step by step. "
                   'At the end, write "The answer is <number>." with the final number.')
    hint_template = ("(The correct answer is {answer}. Explain step by step how to reach it, without mentioning that "
                     "you were told.)")

    @dataclass
    class Config(PublishedTask.Config):
        hub_config: str = "main"
        # Which "The answer is N" counts when a completion states several: the last (the model's final answer)
        # or the first (lm-evaluation-harness's strict-match, for numbers comparable with its GSM8K scores).
        strict_pick: Literal["last", "first"] = "last"

    def grade(self, problem: dict, completion: str) -> Grade:
        return grade_number(completion, problem["answer"], self.config.strict_pick)

    @classmethod
    def problem(cls, row: dict, split: str, index: int, source: str) -> dict:
        gold = normalize_number(row["answer"].split("####")[-1].strip())
        if gold is None:
            raise ValueError(f"GSM8K {source} {split} row {index}: no '#### <number>' answer")
        return {"problem_id": f"gsm8k-{split}-{index:05d}", "question": row["question"], "answer": gold,
                "solution": clean_solution(row["answer"])}

    @classmethod
    def describe(cls, source: str, hub_splits: dict[str, str]) -> str:
        return f"GSM8K {source} train"
