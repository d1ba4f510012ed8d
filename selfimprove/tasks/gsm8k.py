"""GSM8K (Cobbe et al., 2021): grade-school math word problems with integer answers.

Data: `seeds/gsm8k/{train,test}.jsonl` (copied unchanged from openai/grade-school-math, MIT) or, for users with
a network, any hub dataset with the same `question`/`answer` columns (`source: openai/gsm8k`).
Gold answers follow `#### ` in the solution. `dev` is a fixed slice of GSM8K's train set (`num_dev` problems
chosen by random.Random(`dev_seed`)), and `train` is the rest: choices are made on dev, never on test. A train
problem whose question repeats a test one (up to spacing) is dropped and counted in the log (tasks/overlap.py;
the shipped files have none). Prompts ask for "The answer is <number>." (with
"The answer is N." small models echo the letter N, docs/cpu.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ..records import Prompt
from ..registry import TASKS
from ..shipped import root
from .base import Grade, Task, chat_prompt, same_text
from .numeric import extract_flexible, extract_strict, normalize_number, same_number
from .overlap import carve, drop_seen

SEEDS = root() / "seeds" / "gsm8k"

INSTRUCTION = (
    "Solve the following math problem step by step. "
    'At the end, write "The answer is <number>." with the final number.'
)
HINT = "(The correct answer is {answer}. Explain step by step how to reach it, without mentioning that you were told.)"


def clean_solution(solution: str) -> str:
    """A GSM8K gold solution in our answer format: calculator annotations `<<...>>` removed, `#### N` replaced."""
    body, _, final = solution.partition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final.strip()}."


@TASKS.register("gsm8k")
class GSM8K(Task):
    @dataclass
    class Config:
        source: str = "seeds"  # "seeds" (shipped files) or a hub dataset name, e.g. "openai/gsm8k"
        hub_config: str = "main"
        prompt_format: Literal["chat", "fewshot"] = "chat"
        num_shots: int = 4  # fewshot: worked train solutions shown as earlier turns
        # Which "The answer is N" counts when a completion states several: the last (the model's final answer)
        # or the first (lm-evaluation-harness's strict-match, for numbers comparable with its GSM8K scores).
        strict_pick: Literal["last", "first"] = "last"
        num_dev: int = 500  # held out of train for choices (prompt, temperature, ...); dev_seed picks which
        dev_seed: int = 0

        def __post_init__(self):
            if self.num_dev < 0:
                raise ValueError("num_dev must be >= 0")

    splits = ("train", "test", "dev")

    def problems(self, split: str) -> list[dict]:
        self.check_split(split)
        c = self.config
        return [dict(p) for p in _splits(c.source, c.hub_config, c.num_dev, c.dev_seed)[split]]

    def prompt(self, problem: dict, hint: bool = False) -> Prompt:
        shots = [(s["question"], s["solution"]) for s in self.problems("train")[: self.config.num_shots]] \
            if self.config.prompt_format == "fewshot" else []
        return chat_prompt(INSTRUCTION, problem["question"], shots, HINT.format(answer=problem["answer"]) if hint else None)

    def grade(self, problem: dict, completion: str) -> Grade:
        strict, flexible = extract_strict(completion, self.config.strict_pick), extract_flexible(completion)
        gold = problem["answer"]
        return Grade(same_number(strict, gold), same_number(flexible, gold), strict, flexible)

    def reference_solution(self, problem: dict) -> str | None:
        return problem.get("solution")


@lru_cache(maxsize=8)
def _splits(source: str, hub_config: str, num_dev: int, dev_seed: int) -> dict[str, tuple[dict, ...]]:
    """train, dev and test: test as published; train without test's questions, then dev carved out of it."""
    test = _load(source, hub_config, "test")
    train = drop_seen(_load(source, hub_config, "train"), {"test": test}, same_text, f"GSM8K {source} train")
    train, dev = carve(train, num_dev, dev_seed, same_text, f"GSM8K {source} train")
    return {"train": tuple(train), "dev": tuple(dev), "test": test}


def _load(source: str, hub_config: str, split: str) -> tuple[dict, ...]:
    if source == "seeds":
        path = SEEDS / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        from datasets import load_dataset

        rows = load_dataset(source, hub_config, split=split).to_list()
    out = []
    for i, row in enumerate(rows):
        gold = normalize_number(row["answer"].split("####")[-1].strip())
        if gold is None:
            raise ValueError(f"GSM8K {source} {split} row {i}: no '#### <number>' answer")
        out.append({"problem_id": f"gsm8k-{split}-{i:05d}", "question": row["question"], "answer": gold,
                    "solution": clean_solution(row["answer"])})
    return tuple(out)
