"""Self-correction: the second-attempt conversation, SCoRe's per-attempt rewards, and the five metrics.

SCoRe (Kumar et al., 2024, "Training Language Models to Self-Correct via Reinforcement Learning") asks the
model for an answer (attempt 1), appends a fixed instruction to reconsider it, and asks again (attempt 2).
This module holds what generation, training and evaluation must agree on, with no model code:

- `INSTRUCTION` and `second_prompt`: how attempt 2's prompt is built from attempt 1. The default wording is
  the paper's self-correction instruction without its MATH-specific answer-format sentence ("Final Answer: The
  final answer is $answer$..."): every task here states its own answer format in the first prompt, and the
  instruction asks to keep it.
- `turn_rewards`: the reward each attempt's tokens are trained on, per objective.
- `self_correction_metrics`: Accuracy@t1, Accuracy@t2, Δ(t1,t2), Δi→c and Δc→i (the paper's Table 1 metrics),
  each a per-problem mean with a percentile-bootstrap interval over problems (metrics.summarize).
"""

from __future__ import annotations

from typing import Literal

from .records import Prompt
from .metrics import summarize

INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the question. "
    "Please correct the error, if any, and rewrite the solution. Only output the final solution, and end it "
    "with the final answer in the format asked for above."
)

Objective = Literal["single", "score_stage1", "score_stage2"]
TURNS = {"single": 1, "score_stage1": 2, "score_stage2": 2}


def second_prompt(prompt: Prompt, first_attempt: str, instruction: str = INSTRUCTION) -> Prompt:
    """Attempt 2's prompt: the conversation so far (prompt, attempt 1) and the self-correction instruction.

    Chat prompts get two more messages; a text prompt gets the attempt and the instruction appended as text."""
    if isinstance(prompt, str):
        return f"{prompt}{first_attempt}\n\n{instruction}\n\n"
    return [*prompt, {"role": "assistant", "content": first_attempt}, {"role": "user", "content": instruction}]


def turn_rewards(objective: Objective, rewards: list[float], alpha: float = 10.0) -> list[float | None]:
    """The reward each attempt's tokens are trained on; None = no reward term (only the KL term) for that attempt.

    - `single`: one attempt, its reward.
    - `score_stage1` (SCoRe stage I): only attempt 2 is rewarded; attempt 1 is held near the base by a strong KL
      term (β2), which is the trainer's business.
    - `score_stage2` (SCoRe stage II): r(y1) for attempt 1, and r(y2) + α·(r(y2) − r(y1)) for attempt 2: the
      shaping bonus pays for turning a wrong answer into a right one and charges for the reverse.

    Deviation from the paper: each attempt's tokens are credited with that attempt's reward only (no return
    summed over later turns). Crediting attempt 1 with attempt 2's shaped reward would give it −α·r(y1), i.e.
    teach the model to answer wrongly first so that it can "correct" itself: the collapse the bonus exists to
    prevent. The paper's objective sums the per-attempt rewards; this is that sum with a discount of 0 between
    attempts.
    """
    if len(rewards) != TURNS[objective]:
        raise ValueError(f"objective {objective} has {TURNS[objective]} attempt(s), got {len(rewards)} rewards")
    if objective == "single":
        return [rewards[0]]
    r1, r2 = rewards
    if objective == "score_stage1":
        return [None, r2]
    return [r1, r2 + alpha * (r2 - r1)]


def self_correction_metrics(correct: list[tuple[bool, bool]], seed: int = 0, resamples: int = 1000,
                            groups: list[str] | None = None) -> dict:
    """The five self-correction metrics from (correct at attempt 1, correct at attempt 2) per sample.

    `groups` (a problem id per sample) averages a problem's samples first, so that intervals resample problems;
    without it every sample is its own problem. Δi→c is the share of problems wrong at attempt 1 and right at
    attempt 2 (over all problems, as in the paper), Δc→i the reverse; Δ(t1,t2) = Accuracy@t2 − Accuracy@t1 =
    Δi→c − Δc→i.
    """
    groups = groups if groups is not None else [str(i) for i in range(len(correct))]
    if len(groups) != len(correct):
        raise ValueError(f"{len(groups)} groups for {len(correct)} samples")
    by_problem: dict[str, list[tuple[bool, bool]]] = {}
    for g, pair in zip(groups, correct):
        by_problem.setdefault(g, []).append(pair)
    per_sample = {
        "accuracy@t1": lambda a, b: float(a),
        "accuracy@t2": lambda a, b: float(b),
        "delta_t1_t2": lambda a, b: float(b) - float(a),
        "delta_i_to_c": lambda a, b: float(not a and b),
        "delta_c_to_i": lambda a, b: float(a and not b),
    }
    out: dict = {"problems": len(by_problem)}
    for name, value in per_sample.items():
        per_problem = [sum(value(a, b) for a, b in pairs) / len(pairs) for pairs in by_problem.values()]
        out.update(summarize(name, per_problem, seed, resamples))
    return out
