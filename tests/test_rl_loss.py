"""The RL update's arithmetic against hand computations: each loss aggregation mode's gradient, its independence of
how the batch is split, the KL term's value and gradient, truncated importance weights and the sampler–trainer
gap; that β = 0 runs no reference; that truncated sampling is refused for RL; that every shipped RL pipeline
states its aggregation; and, on the shared engine, that the sampler's log-probabilities are the trainer's."""

import math

import pytest

from selfimprove.trainers.rl import (PolicyGradient, Rollout, aggregate, encode_rollout, is_weights, kl_k3,
                                     sampled_logprobs)

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def flat(rows):
    return [v for row in rows for v in row]


def _grad(mode, logp_values, mask_values, advantages, *, tokens, sequences, max_tokens=4):
    import torch

    logp = torch.tensor(logp_values, requires_grad=True)
    mask = torch.tensor(mask_values)
    adv = torch.tensor(advantages)[:, None]
    aggregate(-adv * logp, mask, mode, tokens=tokens, sequences=sequences, max_tokens=max_tokens).backward()
    return logp.grad.tolist()


@pytest.mark.parametrize("mode, expected", [
    # ∂loss/∂logp = −A_i · m_ij · factor; sequence 0 (A = 2) has 2 tokens, sequence 1 (A = −1) has 1
    ("token-mean", [[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]),  # 1 / (3 tokens in the batch)
    ("seq-mean-token-mean", [[-0.5, -0.5, 0.0], [0.5, 0.0, 0.0]]),  # 1 / (its 2 or 1 tokens · 2 sequences)
    ("seq-mean-token-sum", [[-1.0, -1.0, 0.0], [0.5, 0.0, 0.0]]),  # 1 / 2 sequences
    ("seq-mean-token-sum-norm", [[-0.25, -0.25, 0.0], [0.125, 0.0, 0.0]]),  # 1 / (max_tokens 4 · 2 sequences)
])
def test_each_aggregation_mode_gradient_by_hand(mode, expected):
    got = _grad(mode, [[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]], [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], [2.0, -1.0],
                tokens=3, sequences=2)
    assert flat(got) == pytest.approx(flat(expected))


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_does_not_depend_on_the_micro_batches(mode):
    """The batch cut two ways gives the same gradient as the whole batch, because the denominators are batch-wide
    (a token-mean over each micro-batch's own tokens would not: checked too)."""
    import torch

    torch.manual_seed(0)
    logp = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.float32)
    adv = [1.5, -0.5, 2.0]
    tokens = int(mask.sum())

    def split(groups, tokens_of=lambda idx: tokens):
        total = [[0.0] * 5 for _ in range(3)]
        for idx in groups:
            grad = _grad(mode, logp[idx].tolist(), mask[idx].tolist(), [adv[i] for i in idx],
                         tokens=tokens_of(idx), sequences=3)
            for row, i in zip(grad, idx):
                total[i] = row
        return total

    whole = flat(split([[0, 1, 2]]))
    assert flat(split([[0], [1, 2]])) == pytest.approx(whole)
    assert flat(split([[0, 1], [2]])) == pytest.approx(whole)
    if mode == "token-mean":  # the mistake this guards against: each micro-batch's own token count
        assert flat(split([[0], [1, 2]], tokens_of=lambda idx: int(mask[idx].sum()))) != pytest.approx(whole)


def test_kl_k3_gradient_by_hand():
    import torch

    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)], requires_grad=True)
    ref = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.6)])
    kl_k3(logp, ref).sum().backward()
    # d/dlogp [exp(ref − logp) − (ref − logp) − 1] = 1 − exp(ref − logp): 1 − 0.5, 1 − 1, 1 − 2
    assert logp.grad.tolist() == pytest.approx([0.5, 0.0, -1.0])


def test_truncated_importance_weights_and_gap_by_hand():
    import torch

    logp = torch.tensor([math.log(0.6), math.log(0.1), math.log(0.4)], requires_grad=True)
    sampler = torch.tensor([math.log(0.2), math.log(0.2), math.log(0.4)])
    w = is_weights(logp, sampler, cap=2.0)
    assert w.tolist() == pytest.approx([2.0, 0.5, 1.0])  # ratios 3 (capped at 2), 0.5, 1
    (w * logp).sum().backward()
    assert logp.grad.tolist() == pytest.approx([2.0, 0.5, 1.0])  # the weight is a constant
    # r − 1 − ln r with r = π_trainer / π_sampler: 3 − 1 − ln 3, 0.5 − 1 − ln 0.5, 0
    assert kl_k3(sampler, logp.detach()).tolist() == pytest.approx([2 - math.log(3), -0.5 + math.log(2), 0.0],
                                                                   abs=1e-6)


def test_sampled_logprobs_align_with_each_attempts_tokens():
    turn = [0, 0, 1, 1, 1, 0, 2, 2]
    logprobs = [[-0.1, -0.2, -0.3, -0.4], [-0.5, -0.6]]  # attempt 1 sampled a 4th token (a stop token not kept)
    got = sampled_logprobs(turn, logprobs, [[5, 6, 7, 2], [8, 9]])
    assert [None if math.isnan(v) else v for v in got] == [None, None, -0.1, -0.2, -0.3, None, -0.5, -0.6]
    # attempt 2 re-tokenized (no sampled ids): its log-probabilities do not belong to these tokens
    got = sampled_logprobs(turn, logprobs, [[5, 6, 7, 2], None])
    assert [None if math.isnan(v) else v for v in got] == [None, None, -0.1, -0.2, -0.3, None, None, None]


def test_rl_refuses_truncated_sampling_naming_the_field():
    from selfimprove.records import SamplingConfig
    from selfimprove.stages.rl import RL

    with pytest.raises(ValueError, match="sampling.top_p"):
        RL.Config(sampling=SamplingConfig(n=4, temperature=1.0, top_p=0.9))


def test_every_shipped_rl_pipeline_states_its_loss_aggregation():
    import yaml

    from selfimprove.shipped import root

    def text(path):  # the file and what it includes
        raw = yaml.safe_load(path.read_text())
        return path.read_text() + (text(path.parent / raw["include"]) if raw.get("include") else "")

    rl = [p for p in root().glob("pipelines/*.yaml") if "policy_gradient" in text(p) or "reinforce_pp" in p.name]
    assert len(rl) >= 6
    assert [p.name for p in rl if "loss_agg_mode" not in text(p)] == []


def _trainer(tiny_model, tmp_path, **config):
    trainer = PolicyGradient(PolicyGradient.Config(**config))
    trainer.setup(tiny_model, None, seed=0)
    return trainer, trainer.save(tmp_path / "v0")


def test_beta_zero_runs_no_reference(tiny_model, tmp_path):
    trainer, version = _trainer(tiny_model, tmp_path)
    rollouts = [Rollout("p", [PROMPT], [c], [True], [r], version) for c, r in [("5", 1.0), ("6", 0.0)]]

    def no_reference():
        raise AssertionError("the reference (adapter disabled) was run with every KL weight 0")

    trainer.model.disable_adapter = no_reference
    assert trainer.step(rollouts, [0.0], 1.0, 8)["kl/attempt1"] is None


def test_gap_and_importance_sampling_on_the_trainer(tiny_model, tmp_path):
    """Sampler log-probabilities set to the trainer's own minus δ: every token's gap is δ, its k3 e^δ − 1 − δ, and
    with a cap below e^δ the policy-gradient loss is the uncorrected one times the cap."""
    import torch

    delta, cap = 0.5, 1.2
    losses = {}
    for corrected in (False, True):
        trainer, version = _trainer(tiny_model, tmp_path / str(corrected), loss_agg_mode="seq-mean-token-sum",
                                    importance_sampling_cap=cap if corrected else None)
        rollouts = []
        for text, reward in [("It is 5.", 1.0), ("6", 0.0)]:
            ids, owner = encode_rollout(trainer.tokenizer, [PROMPT], [text], [True])
            sampled = [i for i, o in zip(ids, owner) if o == 1]
            with torch.no_grad():
                logp = trainer._logps(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), 1.0)[0]
            own = [lp.item() - delta for lp, o in zip(logp, owner[1:]) if o == 1]
            rollouts.append(Rollout("p", [PROMPT], [text], [True], [reward], version, [sampled], [own]))
        out = trainer.step(rollouts, [0.0], 1.0, 8)
        assert out["sampler_gap/mean_abs"] == pytest.approx(delta, abs=1e-4)
        assert out["sampler_gap/max_abs"] == pytest.approx(delta, abs=1e-4)
        assert out["sampler_gap/kl"] == pytest.approx(math.exp(delta) - 1 - delta, abs=1e-4)
        losses[corrected] = out["loss"]
    assert abs(losses[False]) > 1e-3
    assert losses[True] == pytest.approx(cap * losses[False], rel=1e-4)


def test_importance_sampling_needs_the_samplers_logprobs(tiny_model, tmp_path):
    trainer, version = _trainer(tiny_model, tmp_path, importance_sampling_cap=2.0)
    rollouts = [Rollout("p", [PROMPT], [c], [True], [r], version) for c, r in [("5", 1.0), ("6", 0.0)]]
    with pytest.raises(ValueError, match="importance_sampling_cap"):
        trainer.step(rollouts, [0.0], 1.0, 8)


def test_vllm_reports_the_log_probabilities_the_trainer_computes(engine, tiny_model, tmp_path):
    """At temperature 0.5 the engine's processed log-probabilities are the trainer's logits / 0.5 (float32, no
    update yet: the gap is numerical noise), and clearly not the unscaled ones."""
    import torch

    from selfimprove.records import SamplingConfig, Weights

    trainer, version = _trainer(tiny_model, tmp_path)
    weights = Weights.of(tiny_model, str(tmp_path / "v0" / "adapter"), "v0")
    (completions,) = engine.generate([PROMPT], SamplingConfig(n=2, temperature=0.5, max_tokens=8), weights, seed=3)
    rollouts = [Rollout("p", [PROMPT], [c.text], [c.finish_reason == "stop"], [float(i)], version, [c.token_ids],
                        [c.logprobs]) for i, c in enumerate(completions)]
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in completions)
    ids, owner = encode_rollout(trainer.tokenizer, [PROMPT], [completions[0].text], [rollouts[0].eos[0]],
                                [completions[0].token_ids])
    with torch.no_grad():
        raw = trainer._logps(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), 1.0)[0]
    unscaled = [lp.item() for lp, o in zip(raw, owner[1:]) if o == 1]
    assert max(abs(a - b) for a, b in zip(unscaled, completions[0].logprobs)) > 0.05
    out = trainer.step(rollouts, [0.0], 0.5, 8)
    assert out["sampler_gap/max_abs"] < 1e-3 and out["sampler_gap/kl"] < 1e-6


def test_hf_engine_samples_the_full_distribution_and_reports_its_log_probabilities(tiny_model, tmp_path):
    """The HF engine's log-probabilities are the trainer's at the sampling temperature: generate's default top-k
    cut (50) would put a gap of ~log(vocab / 50) on every token of the random model."""
    from selfimprove.engines.hf_engine import HFEngine
    from selfimprove.records import SamplingConfig, Weights

    trainer, version = _trainer(tiny_model, tmp_path)
    engine = HFEngine(HFEngine.Config(batch_size=4), tiny_model)
    (completions,) = engine.generate([PROMPT], SamplingConfig(n=2, temperature=0.5, max_tokens=8), Weights(tiny_model),
                                     seed=1)
    assert all(len(c.logprobs) == len(c.token_ids) > 0 for c in completions)
    rollouts = [Rollout("p", [PROMPT], [c.text], [c.finish_reason == "stop"], [float(i)], version, [c.token_ids],
                        [c.logprobs]) for i, c in enumerate(completions)]
    out = trainer.step(rollouts, [0.0], 0.5, 8)
    assert out["sampler_gap/max_abs"] < 1e-3 and out["sampler_gap/kl"] < 1e-6
