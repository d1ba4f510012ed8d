"""Self-correction: the second-attempt conversation, SCoRe's per-attempt rewards, and the five metrics.

SCoRe (Kumar et al., 2024, "Training Language Models to Self-Correct via Reinforcement Learning") asks the
model for an answer (attempt 1), appends a fixed instruction to reconsider it, and asks again (attempt 2).
This module holds what the SCoRe objectives (objectives/score.py) and the two-attempt evaluation
(stages/evaluate.py) must agree on, with no model code:

- `INSTRUCTION` and `second_prompt`: how attempt 2's prompt is built from attempt 1. The default wording is
  the paper's self-correction instruction without its MATH-specific answer-format sentence ("Final Answer: The
  final answer is $answer$..."): every task here states its own answer format in the first prompt, and the
  instruction asks to keep it.
- `self_correction_metrics`: Accuracy@t1, Accuracy@t2, Δ(t1,t2), Δi→c and Δc→i (the paper's Table 1 metrics),
  each a per-problem mean with its interval (metrics.summarize: Wilson for proportions, else the bootstrap;
  Δ(t1,t2) with one sample per problem: Newcombe's paired interval and the exact McNemar p), and next to them
  the Confidence/Critique decomposition of Yang et al. (ACL 2025, "Confidence v.s. Critique: A Decomposition
  of Self-Correction Capability for LLMs"): `confidence` = P(correct at t2 | correct at t1) and `critique` =
  P(correct at t2 | wrong at t1), so that Accuracy@t2 = Accuracy@t1 · confidence + (1 − Accuracy@t1) · critique.
  Δi→c and Δc→i are shares of all problems and move with Accuracy@t1; the two conditionals do not.
"""

from __future__ import annotations

from .records import Prompt
from .metrics import paired_difference, ratio, summarize

INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the question. "
    "Please correct the error, if any, and rewrite the solution. Only output the final solution, and end it "
    "with the final answer in the format asked for above."
)

def second_prompt(prompt: Prompt, first_attempt: str, instruction: str = INSTRUCTION) -> Prompt:
    """Attempt 2's prompt: the conversation so far (prompt, attempt 1) and the self-correction instruction.

    Chat prompts get two more messages; a text prompt gets the attempt and the instruction appended as text."""
    if isinstance(prompt, str):
        return f"{prompt}{first_attempt}\n\n{instruction}\n\n"
    return [*prompt, {"role": "assistant", "content": first_attempt}, {"role": "user", "content": instruction}]


def self_correction_metrics(correct: list[tuple[bool, bool]], seed: int, resamples: int,
                            groups: list[str] | None = None) -> dict:
    """The self-correction metrics from (correct at attempt 1, correct at attempt 2) per sample.

    `groups` (a problem id per sample) averages a problem's samples first, so that intervals resample problems;
    without it every sample is its own problem. Δi→c (wrong at attempt 1, right at 2) and Δc→i are shares of all
    problems, as in the paper; Δ(t1,t2) = Accuracy@t2 − Accuracy@t1 = Δi→c − Δc→i. `confidence` and `critique`
    pool a problem's samples (`confidence_n` / `critique_n`: those right / wrong at attempt 1): the paper's mean
    of per-problem probabilities weighted by P(right at t1) when every problem has the same number of samples."""
    groups = groups if groups is not None else [str(i) for i in range(len(correct))]
    if len(groups) != len(correct):
        raise ValueError(f"{len(groups)} groups for {len(correct)} samples")
    by_problem: dict[str, list[tuple[bool, bool]]] = {}
    for g, pair in zip(groups, correct):
        by_problem.setdefault(g, []).append(pair)
    out: dict = {"problems": len(by_problem)}
    for name, value in (("accuracy@t1", lambda a, b: a), ("accuracy@t2", lambda a, b: b),
                        ("delta_i_to_c", lambda a, b: not a and b), ("delta_c_to_i", lambda a, b: a and not b)):
        per_problem = [sum(float(value(a, b)) for a, b in pairs) / len(pairs) for pairs in by_problem.values()]
        out.update(summarize(name, per_problem, seed, resamples))
    if all(len(pairs) == 1 for pairs in by_problem.values()):  # one 0/1 outcome per attempt: a paired proportion
        d = paired_difference([pairs[0][0] for pairs in by_problem.values()],
                              [pairs[0][1] for pairs in by_problem.values()])
        out.update({"delta_t1_t2": d.difference, "delta_t1_t2_ci_low": d.ci_low, "delta_t1_t2_ci_high": d.ci_high,
                    "delta_t1_t2_p": d.p_value})
    else:
        per_problem = [sum(float(b) - float(a) for a, b in pairs) / len(pairs) for pairs in by_problem.values()]
        out.update(summarize("delta_t1_t2", per_problem, seed, resamples, outcomes=False))
    for name, first in (("confidence", True), ("critique", False)):
        trials = [sum(bool(a) == first for a, _ in pairs) for pairs in by_problem.values()]
        kept = [sum(bool(a) == first and bool(b) for a, b in pairs) for pairs in by_problem.values()]
        out.update(ratio(name, kept, trials, seed, resamples))
    return out
