"""Policy-gradient baselines and RL objectives against hand-computed values, each a plugin resolved from YAML the way
a pipeline resolves it; and the trainer's loss under each aggregation mode against log-probabilities computed
independently (the modes' gradients by hand: test_rl_loss.py)."""

import math

import pytest

from selfimprove.config import ConfigError
from selfimprove.registry import BaselineSpec, ObjectiveSpec

REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 3.0, 1.0]
GROUPS = ["a", "a", "a", "a", "b", "b", "c", "c"]


def advantages(name: str, rewards=REWARDS, groups=GROUPS, **params):
    return BaselineSpec.from_config({"name": name, **params}, "test", "baseline").build().advantages(rewards, groups)


def test_grpo_hand_computed():
    # group a: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 → ±0.5 / (0.57735 + 1e-4); b: no spread;
    # c: mean 2, std sqrt(2) → ±1 / (1.41421 + 1e-4)
    got = advantages("grpo")
    a, c = 0.5 / (math.sqrt(1 / 3) + 1e-4), 1 / (math.sqrt(2) + 1e-4)
    assert got == pytest.approx([a, -a, -a, a, 0.0, 0.0, c, -c], abs=1e-9)


def test_rloo_hand_computed():
    # r_i minus the mean of the *other* samples of its group: a 1 against [0, 0, 1] → 1 − 1/3, a 0 against
    # [1, 0, 1] → −2/3; group c: 3 − 1, 1 − 3
    got = advantages("rloo")
    assert got == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0, 2.0, -2.0])


def test_dr_grpo_hand_computed():
    # r_i minus the group mean, no division by the std
    assert advantages("dr_grpo") == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 1.0, -1.0])


def test_reinforce_pp_hand_computed():
    # centred per group: [.5, -.5, -.5, .5, 0, 0, 1, -1]; batch mean 0, unbiased batch std sqrt(3/7);
    # normalised over the whole batch: .5·sqrt(7/3) and 1·sqrt(7/3)
    got = advantages("reinforce_pp")
    k = math.sqrt(7 / 3)
    assert got == pytest.approx([0.5 * k, -0.5 * k, -0.5 * k, 0.5 * k, 0.0, 0.0, k, -k], abs=1e-6)
    # unlike GRPO, a group whose samples differ by a hair stays small next to one that differs a lot
    small = advantages("reinforce_pp", [1.0, 1.001, 0.0, 1.0], ["a", "a", "b", "b"])
    assert abs(small[0]) < 0.01 < abs(small[2])
    assert abs(advantages("grpo", [1.0, 1.001], ["a", "a"])[0]) > 0.5


def test_baselines_give_no_advantage_without_a_reward_or_a_group():
    for name in ("grpo", "rloo", "dr_grpo", "reinforce_pp"):
        assert advantages(name, [None, None], ["a", "a"]) == [0.0, 0.0]
        assert advantages(name, [4.0], ["a"]) == [0.0]


def test_unknown_baseline_names_the_choices():
    with pytest.raises(ConfigError, match="unknown baseline 'ppo'.*dr_grpo, grpo, reinforce_pp, rloo"):
        BaselineSpec.from_config("ppo", "pipe.yaml", "stages.rl.trainer.baseline")


def objective(spec):
    return ObjectiveSpec.from_config(spec, "test", "objective").build()


def test_objectives_rewards_and_kl_weights():
    single = objective("single")
    assert single.attempts == 1 and single.rewards([0.7]) == [0.7] and single.kl_weights() == [0.01]
    stage1 = objective({"name": "score_stage1", "beta2": 0.2})
    assert stage1.attempts == 2 and stage1.rewards([1.0, 0.0]) == [None, 0.0]  # stage I: attempt 2 only
    assert stage1.kl_weights() == [0.2, 0.01]  # β2 on attempt 1, β1 on attempt 2
    stage2 = objective("score_stage2")
    assert stage2.rewards([0.0, 1.0]) == [0.0, 11.0]  # incorrect → correct: r2 + α(r2 − r1), α = 10
    assert stage2.rewards([1.0, 0.0]) == [1.0, -10.0]  # correct → incorrect
    assert stage2.rewards([1.0, 1.0]) == [1.0, 1.0]
    assert objective({"name": "score_stage2", "alpha": 2.0}).rewards([0.2, 0.5]) == pytest.approx([0.2, 1.1])
    assert stage2.kl_weights() == [0.01, 0.01]
    prompt = [{"role": "user", "content": "2 + 2?"}]
    follow = objective({"name": "score_stage1", "instruction": "Check it."}).follow_up(prompt, "5")
    assert follow == [*prompt, {"role": "assistant", "content": "5"}, {"role": "user", "content": "Check it."}]
    with pytest.raises(ConfigError, match="alpha"):
        objective({"name": "score_stage2", "alpha": -1})


def test_the_step_loss_follows_loss_agg_mode(tiny_model, tmp_path):
    import torch

    from selfimprove.trainers.rl import PolicyGradient, Rollout, encode_rollout

    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    completions = ["It is 5, I think, after adding two and three.", "6"]  # very different lengths
    budget = 32
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        trainer = PolicyGradient(PolicyGradient.Config(loss_agg_mode=mode))
        trainer.setup(tiny_model, None, seed=0)
        version = trainer.save(tmp_path / mode)
        rollouts = [Rollout("p", [prompt], [c], [True], [r], version) for c, r in zip(completions, [1.0, 0.0])]
        # independent log-probabilities of each completion's tokens under the (unchanged) policy
        sums, counts = [], []
        trainer.model.eval()
        for r in rollouts:
            ids, owner = encode_rollout(trainer.tokenizer, r.prompts, r.completions, r.eos)
            with torch.no_grad():
                logits = trainer.model(torch.tensor([ids])).logits[0, :-1].float()
            logp = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            mask = torch.tensor(owner[1:]) == 1
            sums.append(logp[mask].sum().item())
            counts.append(int(mask.sum()))
        adv = trainer.baseline.advantages([1.0, 0.0], ["p", "p"])
        expected = {
            "token-mean": sum(-a * s for a, s in zip(adv, sums)) / sum(counts),
            "seq-mean-token-mean": sum(-a * s / n for a, s, n in zip(adv, sums, counts)) / 2,
            "seq-mean-token-sum": sum(-a * s for a, s in zip(adv, sums)) / 2,
            "seq-mean-token-sum-norm": sum(-a * s / budget for a, s in zip(adv, sums)) / 2,
        }[mode]
        out = trainer.step(rollouts, [0.0], temperature=1.0, max_tokens=budget)
        assert out["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6), mode
        assert out["kl/attempt1"] is None  # KL weight 0: no reference forward, nothing measured
        assert out["sampler_gap/mean_abs"] is None  # no sampler log-probabilities given: nothing measured
    assert counts[0] > counts[1] + 5  # the normalisations really differ on these completions
