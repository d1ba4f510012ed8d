"""Monte-Carlo step labels (Math-Shepherd: Wang et al., 2024): how good is each step of a response, judged by
where rollouts from it lead.

For a response split into steps s_1..s_m (`Task.steps`), the prefix s_1..s_i is continued K times by the policy
and each continuation graded against the gold answer (`Task.grade`, strict). Step i's soft label is the fraction
of its K rollouts that reach the right answer (Math-Shepherd's SE), its hard label whether any does (HE).
All prefixes of all responses go to the engine in one `generate` call (n = K), so an engine with prefix caching
(vLLM) computes each shared prompt once.

A prefix is continued as the assistant's own unfinished reply: the chat prompt rendered with the generation
prompt, then the prefix's text, sent to the engine as a raw text prompt (`continuation`).

Deviations from the paper:
- The last step is labelled by grading the response itself (soft = hard = 1 or 0), without rollouts: a complete
  response has nothing left to roll out, and its answer is what the rollouts would be graded on.
- Steps are the task's (lines by default), not the paper's "ки"-tagged steps of a fine-tuned generator.
- A rollout is graded by the task's strict grader (the answer format counts), as evaluation grades.
- Raw-text prompts are tokenized by the engine as it tokenizes text: vLLM adds the tokenizer's BOS when the
  tokenizer has one, which a chat template that writes its own BOS would then double (SmolLM's has none).

Where the task has an exact per-step oracle (arithmetic's `step_verdicts`), `oracle_agreement` measures the MC
labels against it: a prefix is right when every step in it is (`prefix_verdicts`), and the agreement of the hard
label and of soft >= 0.5 with that is reported for every K' <= K (the first K' rollouts of each step).
"""

from __future__ import annotations

from typing import Callable

from .records import Prompt, SamplingConfig, Weights


def prefix_verdicts(verdicts: list[bool]) -> list[bool]:
    """Per step, whether the response up to and including it is right: every step so far is."""
    out, ok = [], True
    for v in verdicts:
        ok = ok and bool(v)
        out.append(ok)
    return out


def step_prefixes(steps: list[str]) -> list[str]:
    """The response's text up to and including each step, each ending in a newline (the next step's start)."""
    return ["\n".join(steps[: i + 1]) + "\n" for i in range(len(steps))]


def chat_tokenizer(engine, base: str):
    """The chat template's tokenizer: the engine's own where it exposes one, else the base model's."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
    return tokenizer


def chat_continuation(tokenizer) -> Callable[[Prompt, str], str]:
    """`continuation(prompt, prefix)`: a raw text prompt that continues the assistant's reply `prefix` to the
    chat `prompt` (rendered by `tokenizer`'s chat template with the generation prompt); a text prompt is just
    extended with the prefix."""

    def continuation(prompt: Prompt, prefix: str) -> str:
        if isinstance(prompt, str):
            return prompt + prefix
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) + prefix

    return continuation


def mc_step_labels(engine, task, samples: list[dict], rollouts: int, sampling: SamplingConfig, weights: Weights,
                   seed: int, continuation: Callable[[Prompt, str], str]) -> list[dict]:
    """One row per sample: its `steps`, per step the rollouts' `outcomes` (K bools; [] for the last step), the
    `soft` and `hard` labels, and the exact `oracle` prefix verdicts where the task has them (else None).

    `samples` are sample rows (the problem's columns, `prompt`, `completion`); `sampling.n` is replaced by
    `rollouts`. One engine call covers every non-final prefix of every sample."""
    from dataclasses import replace

    steps = [task.steps(s["completion"]) for s in samples]
    prompts, where = [], []  # where[j] = (sample index, step index, prefix text) of prompts[j]
    for i, (s, st) in enumerate(zip(samples, steps)):
        for k, prefix in enumerate(step_prefixes(st)[:-1]):
            prompts.append(continuation(s["prompt"], prefix))
            where.append((i, k, prefix))
    outcomes = [[[] for _ in st] for st in steps]
    if prompts:
        results = engine.generate(prompts, replace(sampling, n=rollouts).stopping_at(task.stop()), weights, seed)
        for (i, k, prefix), completions in zip(where, results):
            outcomes[i][k] = [bool(task.grade(samples[i], prefix + c.text).correct) for c in completions]
    rows = []
    for s, st, out in zip(samples, steps, outcomes):
        final = bool(task.grade(s, s["completion"]).correct)
        soft = [sum(o) / len(o) for o in out[:-1]] + [float(final)] if st else []
        hard = [any(o) for o in out[:-1]] + [final] if st else []
        oracle = task.step_verdicts(s, s["completion"])
        rows.append({"sample_id": s["sample_id"], "problem_id": s["problem_id"], "prompt": s["prompt"],
                     "completion": s["completion"], "steps": st, "outcomes": out, "soft": soft, "hard": hard,
                     "oracle": None if oracle is None else prefix_verdicts(oracle)})
    return rows


def oracle_agreement(rows: list[dict]) -> dict[str, float]:
    """Agreement of MC labels with the exact prefix oracle, over the rolled-out (non-final) steps of rows that
    have one, for each K' from 1 to the rollouts per step (each step's first K' rollouts):
    `agreement/hard@K'` (any rollout right ⇔ prefix right) and `agreement/soft@K'` (soft >= 0.5 ⇔ prefix right),
    plus `agreement/steps`, the number of steps compared. Empty when no row has an oracle."""
    pairs = [(o, r["oracle"][k]) for r in rows if r.get("oracle") is not None
             for k, o in enumerate(r["outcomes"]) if o]
    if not pairs:
        return {}
    most = max(len(o) for o, _ in pairs)
    out: dict[str, float] = {"agreement/steps": len(pairs)}
    for k in range(1, most + 1):
        hard = [any(o[:k]) == right for o, right in pairs]
        soft = [(sum(o[:k]) / len(o[:k]) >= 0.5) == right for o, right in pairs]
        out[f"agreement/hard@{k}"] = sum(hard) / len(hard)
        out[f"agreement/soft@{k}"] = sum(soft) / len(soft)
    return out
