"""The methods learn: each one, run through its real trainer on the tiny random model, raises a measured score.

The task is built to be learnable in seconds on CPU: a fixed mapping from four prompts (a key word repeated) to
four answer words, each a single token of the SmolLM2 tokenizer. Scores are exact, not sampled: one forward pass
gives the policy's next-token distribution after the chat template's assistant header, and from it
- `accuracy`: the share of prompts whose most likely token (over the whole vocabulary) is the right word;
- `share`: the mean probability of the right word divided by the probability of all four words (chance: 1/4).
The random model's tied output embeddings are small (norm ~0.16 after a norm-8 hidden state), so no logit moves
by more than ~1.4: `share` cannot pass ~0.6, and the probability over the whole vocabulary stays tiny.

Each check (figures from seed 0 on CPU, float32; the margins leave room for seed and platform drift):
- SFT from the random model: greedy accuracy 0 → 1 (share 0.27 → 0.53).
- DPO from the random model, the right word chosen over each wrong one: share 0.27 → 0.57 (asserted > 0.4).
- RL from the random model, each baseline (grpo, rloo, dr_grpo, reinforce_pp), reward 1 for the right word,
  12 updates of 8 rollouts per prompt: share 0.27 → 0.55-0.56 (asserted: a rise of more than 0.15).
  Deviation from a pipeline run: rollouts are one token drawn from the policy's distribution restricted to the
  four words (the random model almost never samples one of them over 49k tokens, so every reward would be 0),
  drawn with torch so that the file needs no engine; the update is the trainer's real `step`.
- The same RL run with every advantage negated drives share down (0.27 → 0.17): the RL check bites.
- One STaR round (8 samples per prompt from the base's distribution over the four words, keep ≤ 2 correct per
  prompt, SFT from the base): accuracy 0 → 1; the same round keeping the wrong answers learns none of the
  mapping. Deviation from a pipeline run: sampling and the correctness filter are written out here (the random
  model never writes one of the four words over its whole vocabulary), the fine-tuning is the real SFT trainer.
"""

from __future__ import annotations

import pytest

from selfimprove.registry import BaselineSpec
from selfimprove.trainers.common import LoraSettings, Optimization
from selfimprove.trainers.dpo import DPO
from selfimprove.trainers.rl import PolicyGradient, Rollout
from selfimprove.trainers.sft import SFT

KEYS = ["apple", "river", "stone", "cloud"]
WORDS = ["red", "blue", "green", "gold"]  # one token each
# Every projection: the random model's tied output embeddings are small (norm ~0.16), so a logit moves by at most
# ~1.4 and the hidden state must turn far to single out one word.
LORA = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"])


def prompt(key: str) -> list[dict]:
    # The key repeated: the random model's attention is near uniform, so a key said once is drowned by the
    # system prompt and the four prompts look alike at the answer position.
    return [{"role": "user", "content": " ".join([key] * 24)}]


def answer(word: str) -> list[dict]:
    return [{"role": "assistant", "content": word}]


def next_token_probs(model, tok, keys=KEYS):
    """The policy's distribution over the first answer token, one row per prompt."""
    import torch

    rows = []
    with torch.no_grad():
        for key in keys:
            text = tok.apply_chat_template(prompt(key), tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)], device=model.device)
            rows.append(model(input_ids=ids).logits[0, -1].float().softmax(-1))
    return torch.stack(rows)


def word_ids(tok) -> list[int]:
    ids = [tok.encode(w, add_special_tokens=False) for w in WORDS]
    assert all(len(i) == 1 for i in ids), "each answer word must be one token"
    return [i[0] for i in ids]


def scores(model, tok) -> dict:
    probs = next_token_probs(model, tok)
    ids = word_ids(tok)
    right = probs[range(len(KEYS)), ids]
    return {"accuracy": sum(int(probs[i].argmax()) == ids[i] for i in range(len(KEYS))) / len(KEYS),
            "share": (right / probs[:, ids].sum(-1)).mean().item()}


def scores_of(base: str, adapter: str | None) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return scores(model, AutoTokenizer.from_pretrained(base))


def test_sft_learns_the_mapping(tiny_model, tmp_path):
    before = scores_of(tiny_model, None)
    rows = [{"prompt": prompt(k), "completion": answer(w)} for k, w in zip(KEYS, WORDS)]
    trainer = SFT(SFT.Config(lora=LORA, optim=Optimization(learning_rate=5e-3, max_steps=40, batch_size=4,
                                                           logging_steps=10, checkpoint_every=0)))
    trainer.train(rows, tiny_model, None, tmp_path / "adapter", tmp_path / "work", seed=0, round_index=1)
    after = scores_of(tiny_model, str(tmp_path / "adapter"))
    # The random model never puts an answer word first (accuracy 0); after SFT every prompt is answered right.
    assert before["accuracy"] == 0.0
    assert after["accuracy"] == 1.0, after
    assert after["share"] > 0.4, after


def test_dpo_prefers_the_right_word(tiny_model, tmp_path):
    before = scores_of(tiny_model, None)
    rows = [{"prompt": prompt(k), "chosen": answer(w), "rejected": answer(other)}
            for k, w in zip(KEYS, WORDS) for other in WORDS if other != w]
    trainer = DPO(DPO.Config(lora=LORA, optim=Optimization(learning_rate=5e-3, max_steps=20, batch_size=4,
                                                           logging_steps=10, checkpoint_every=0)))
    trainer.train(rows, tiny_model, None, tmp_path / "adapter", tmp_path / "work", seed=0, round_index=1)
    after = scores_of(tiny_model, str(tmp_path / "adapter"))
    assert abs(before["share"] - 0.25) < 0.1, before  # the random model: about even among the four words
    assert after["share"] > 0.4, (before, after)


def star_round(base: str, folder, keep_correct: bool = True) -> tuple[list[str], dict]:
    """One STaR round without rationalization: sample 8 one-word answers per prompt from the base model's
    distribution over the four words (as the RL rollouts below are drawn), keep at most 2 correct answers per
    prompt (the main job's `max_per_problem`), fine-tune a fresh adapter from the base on them with the real SFT
    trainer. `keep_correct=False` keeps the wrong answers instead (a broken filter, to show the check bites)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = word_ids(tok)
    probs = next_token_probs(model, tok)[:, ids]
    generator = torch.Generator().manual_seed(0)
    rows, kept = [], []
    for i, key in enumerate(KEYS):
        samples = [WORDS[j] for j in torch.multinomial(probs[i], 8, replacement=True, generator=generator).tolist()]
        chosen = [w for w in samples if (w == WORDS[i]) == keep_correct][:2]
        kept += chosen
        rows += [{"prompt": prompt(key), "completion": answer(w)} for w in chosen]
    trainer = SFT(SFT.Config(lora=LORA, optim=Optimization(learning_rate=5e-3, max_steps=40, batch_size=4,
                                                           logging_steps=10, checkpoint_every=0)))
    trainer.train(rows, base, None, folder / "adapter", folder / "work", seed=0, round_index=1)
    return kept, scores_of(base, str(folder / "adapter"))


def test_star_round_learns_from_its_own_correct_samples(tiny_model, tmp_path):
    kept, after = star_round(tiny_model, tmp_path)
    # 8 samples per prompt at ~1/4 each: every prompt keeps a correct answer (seed 0), and only correct ones
    assert len(kept) >= len(KEYS) and all(w in WORDS for w in kept)
    assert after["accuracy"] == 1.0, after
    assert after["share"] > 0.4, after


def test_star_round_on_wrong_samples_does_not_learn(tiny_model, tmp_path):
    """The STaR check bites: a filter that keeps the wrong answers leaves no prompt answered right."""
    _, after = star_round(tiny_model, tmp_path, keep_correct=False)
    assert after["accuracy"] == 0.0 and after["share"] < 0.25, after


def run_rl(base: str, baseline: str, folder, steps: int = 12, samples: int = 8,
           flip: bool = False) -> tuple[dict, dict]:
    """`steps` updates, each on `samples` one-word rollouts per prompt, drawn from the policy's distribution over
    the four words; scores before and after. `flip` negates every advantage (a broken update, to show the check
    bites)."""
    import torch

    trainer = PolicyGradient(PolicyGradient.Config(lora=LORA, learning_rate=2e-2,
                                                   baseline=BaselineSpec.named(baseline)))
    trainer.setup(base, None, seed=0)
    if flip:
        advantages = trainer.baseline.advantages
        trainer.baseline.advantages = lambda rewards, groups: [-a for a in advantages(rewards, groups)]
    trainer.model.eval()
    before = scores(trainer.model, trainer.tokenizer)
    ids = word_ids(trainer.tokenizer)
    version = trainer.save(folder / "v0")
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        trainer.model.eval()
        probs = next_token_probs(trainer.model, trainer.tokenizer).cpu()[:, ids]
        rollouts = []
        for i, key in enumerate(KEYS):
            for token in (ids[j] for j in torch.multinomial(probs[i], samples, replacement=True,
                                                            generator=generator).tolist()):
                text = trainer.tokenizer.decode([token])
                rollouts.append(Rollout(group=key, prompts=[prompt(key)], completions=[text], eos=[False],
                                        rewards=[float(token == ids[i])], version=version, token_ids=[[token]]))
        trainer.step(rollouts, kl_weights=[0.0], temperature=1.0, max_tokens=1)
        version = trainer.save(folder / f"v{step + 1}")
    trainer.model.eval()
    return before, scores(trainer.model, trainer.tokenizer)


@pytest.mark.parametrize("baseline", ["grpo", "rloo", "dr_grpo", "reinforce_pp"])
def test_policy_gradient_raises_the_reward(baseline, tiny_model, tmp_path):
    before, after = run_rl(tiny_model, baseline, tmp_path)
    assert abs(before["share"] - 0.25) < 0.1, before  # the random model: about even among the four words
    assert after["share"] > before["share"] + 0.15, (before, after)


def test_flipped_advantage_sign_lowers_the_reward(tiny_model, tmp_path):
    """The check above bites: the same run with every advantage negated drives the right word down."""
    before, after = run_rl(tiny_model, "grpo", tmp_path, flip=True)
    assert after["share"] < before["share"] - 0.05, (before, after)
