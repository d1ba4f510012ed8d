"""The on-policy RL machinery: the KL estimator and trajectory encoding against hand-computed values; a real
update on the tiny model, served by the shared engine without a restart; stale rollouts refused; single-turn
GRPO/RLOO end to end over two rounds. (Baselines and objectives: test_baselines.py.)"""

import math
import shutil
from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, read_json
from selfimprove.records import SamplingConfig, Weights, adapter_hash
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.selfcorrection import second_prompt
from selfimprove.trainers.common import LoraSettings
from selfimprove.trainers.rl import PolicyGradient, Rollout, StalePolicyError, encode_rollout, kl_k3

REPO = Path(__file__).resolve().parents[1]
TINY_GRPO = REPO / "tests" / "pipelines" / "tiny_grpo.yaml"
PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def quiet(*_):
    pass


def test_kl_k3_hand_computed():
    import torch

    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.6)])
    # exp(ref - logp) - (ref - logp) - 1: 0.5 + ln 2 - 1; 0; 2 - ln 2 - 1
    expected = [0.5 + math.log(2) - 1, 0.0, 2 - math.log(2) - 1]
    assert kl_k3(logp, ref).tolist() == pytest.approx(expected, abs=1e-6)


def test_encode_rollout_assigns_tokens_to_attempts(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [PROMPT, second_prompt(PROMPT, "It is 6.", "Check it.")]
    ids, owner = encode_rollout(tok, prompts, ["It is 6.", "It is 5."], eos=[True, True])
    assert len(ids) == len(owner)
    assert tok.decode([i for i, o in zip(ids, owner) if o == 1]) == "It is 6.<|im_end|>"
    assert tok.decode([i for i, o in zip(ids, owner) if o == 2]) == "It is 5.<|im_end|>"
    # the whole sequence is exactly what the engine saw for attempt 2, plus attempt 2 and its stop token
    rendered = tok.apply_chat_template(prompts[1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(ids) == rendered + "It is 5.<|im_end|>"
    # a truncated attempt (no stop token sampled) owns only its text
    ids, owner = encode_rollout(tok, prompts[:1], ["It is"], eos=[False])
    assert tok.decode([i for i, o in zip(ids, owner) if o == 1]) == "It is"


def _hf_logprob(model, tok, prompt, choice: str) -> float:
    """log P(choice | prompt) from a plain transformers forward pass."""
    import torch

    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    cids = tok.encode(choice, add_special_tokens=False)
    with torch.no_grad():
        logps = model(torch.tensor([ids + cids])).logits[0].float().log_softmax(-1)
    return sum(logps[len(ids) - 1 + j, c].item() for j, c in enumerate(cids))


def test_update_changes_policy_and_engine_serves_it_without_restart(engine, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from selfimprove.engines.merge import merged_folder
    from selfimprove.stages.rollout import sample_chunk
    from selfimprove.tasks.arithmetic import Arithmetic

    task = Arithmetic(Arithmetic.Config(num_train=20, num_test=4, prompt_format="chat"))
    trainer = PolicyGradient(PolicyGradient.Config(learning_rate=2e-2))
    trainer.setup(tiny_model, None, seed=0)
    v0 = trainer.save(tmp_path / "v0")
    w0 = Weights.of(tiny_model, str(tmp_path / "v0" / "adapter"), "v0")
    assert w0.adapter_hash == v0
    rows = sample_chunk(engine=engine, task=task, problems=task.problems("train")[:3],
                        sampling=SamplingConfig(n=2, temperature=1.0, max_tokens=8), weights=w0, seeds=[1, 2],
                        follow_up=lambda p, c: second_prompt(p, c, "Check it."), id_prefix="t")
    assert len(rows) == 6 and all(len(r["attempts"]) == 2 for r in rows)
    assert all(r["attempts"][1]["prompt"] == second_prompt(r["prompt"], r["attempts"][0]["completion"], "Check it.")
               for r in rows)
    # the update trains on exactly the tokens the engine sampled (plus the stop token it ended with)
    eos_id = trainer.tokenizer.eos_token_id
    for r in rows:
        ids, owner = encode_rollout(trainer.tokenizer, [a["prompt"] for a in r["attempts"]],
                                    [a["completion"] for a in r["attempts"]],
                                    [a["finish_reason"] == "stop" for a in r["attempts"]],
                                    [a["token_ids"] for a in r["attempts"]])
        for t, a in enumerate(r["attempts"], start=1):
            own, sampled = [i for i, o in zip(ids, owner) if o == t], list(a["token_ids"])
            assert sampled and own == (sampled if a["finish_reason"] == "length" or sampled[-1] == eos_id
                                       else sampled + [eos_id])
    rewards = [float(len(r["attempts"][1]["completion"])) for r in rows]
    assert len(set(rewards)) > 1, "rewards did not vary: nothing to learn"
    rollouts = [Rollout(r["problem_id"], [a["prompt"] for a in r["attempts"]], [a["completion"] for a in r["attempts"]],
                        [a["finish_reason"] == "stop" for a in r["attempts"]], [None, reward], v0,
                        [a["token_ids"] for a in r["attempts"]])
                for r, reward in zip(rows, rewards)]

    with pytest.raises(StalePolicyError, match="version"):
        trainer.step([Rollout(**{**rollouts[0].__dict__, "version": "0123456789abcdef"})], [0.1, 0.01], 1.0, 8)
    metrics = trainer.step(rollouts, [0.1, 0.01], 1.0, 8)  # SCoRe stage I's coefficients: β2 on attempt 1, β1 on 2
    assert metrics["grad_norm"] > 0 and metrics["tokens"] > 0
    with pytest.raises(StalePolicyError, match="not saved"):
        trainer.step(rollouts, [0.1, 0.01], 1.0, 8)  # the same rollouts are stale once the policy moved
    v1 = trainer.save(tmp_path / "v1")
    assert v1 != v0
    w1 = Weights(tiny_model, str(tmp_path / "v1" / "adapter"), "v1")

    llm, loads = engine.llm, engine.weight_loads
    choice = "The answer is 42."
    served = engine.choice_logprobs([PROMPT], [choice], w1)[0][choice]
    base = engine.choice_logprobs([PROMPT], [choice], Weights(tiny_model))[0][choice]
    assert engine.llm is llm and engine.weight_loads >= loads + 1  # new weights, same running engine
    trainer.model.eval()
    assert served == pytest.approx(_hf_logprob(trainer.model, trainer.tokenizer, PROMPT, choice), abs=2e-3)
    merged = AutoModelForCausalLM.from_pretrained(merged_folder(w1), dtype="float32")
    assert served == pytest.approx(_hf_logprob(merged, trainer.tokenizer, PROMPT, choice), abs=2e-3)
    assert abs(served - base) > 1e-2, "the update did not change what the engine serves"


@pytest.fixture(scope="module")
def grpo_run(engine, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    results = Runner(load_pipeline(TINY_GRPO), run_dir, engine=engine, log=quiet).run()
    return run_dir, results


def test_grpo_pipeline_chains_versions_and_rounds(grpo_run):
    run_dir, results = grpo_run
    assert [r["round"] for r in results] == [0, 1, 2]  # the accuracy curve: base, round 1, round 2
    for r in (1, 2):
        rl = run_dir / f"round_{r:03d}" / "rl"
        manifest = read_json(rl / "manifest.json")
        assert manifest["metrics"]["steps"] == 2 and manifest["metrics"]["objective"] == "single"
        rows = load_rows(rl / "data")
        assert len(rows) == 2 * 3 * 3 and all("attempts" not in row for row in rows)
        # each step sampled with the version the previous step saved
        versions = sorted((rl / "versions").iterdir())
        assert [v.name for v in versions] == ["00000", "00001", "00002"]
        for step in (0, 1):
            step_rows = [row for row in rows if row["step"] == step]
            assert {row["weights"]["adapter_hash"] for row in step_rows} == {adapter_hash(versions[step] / "adapter")}
        assert not list((rl / "versions").glob("*/adapter-merged"))  # caches cleaned up
        assert [(v / "optimizer.pt").exists() for v in versions] == [False, True, True]
    # round 2 continues from round 1's final policy, and round 2's evaluation serves round 2's
    first = read_json(run_dir / "round_001" / "rl" / "weights.json")
    assert adapter_hash(run_dir / "round_002" / "rl" / "versions" / "00000" / "adapter") == first["adapter_hash"]
    assert read_json(run_dir / "round_002" / "evaluate" / "manifest.json")["metrics"]["weights"] == "round_002/rl"


def test_filter_groups_trains_only_on_groups_whose_rewards_differ(engine, tmp_path):
    overrides = ["rounds=1", "evaluate_base=false", "stages.rl.steps=1", "stages.rl.problems_per_step=6",
                 "stages.rl.filter_groups=true", "stages.rl.critic={name: 'tests.plugins:length_score_odd_problems'}"]
    Runner(load_pipeline(TINY_GRPO, overrides), tmp_path / "run", engine=engine, log=quiet).run()
    rl = tmp_path / "run" / "round_001" / "rl"
    step = read_json(rl / "versions" / "00001" / "step.json")
    rows = load_rows(rl / "data")
    odd = {r["problem_id"] for r in rows if int(r["problem_id"][-1]) % 2}
    varied = {p for p in odd if len({len(r["completion"]) for r in rows if r["problem_id"] == p}) > 1}
    assert varied, "no odd problem's samples differed in length: nothing to keep"
    assert step["samples"] == len(rows) and step["trained_samples"] == 3 * len(varied) < len(rows)
    assert step["grad_norm"] > 0

    # every group uniform: no update, and the next version is the same policy
    overrides[-1] = "stages.rl.critic={name: 'tests.plugins:accept_even_problems'}"
    Runner(load_pipeline(TINY_GRPO, overrides), tmp_path / "uniform", engine=engine, log=quiet).run()
    rl = tmp_path / "uniform" / "round_001" / "rl"
    step = read_json(rl / "versions" / "00001" / "step.json")
    assert step["trained_samples"] == 0 and step["grad_norm"] is None and step["kl/attempt1"] is None
    assert adapter_hash(rl / "versions" / "00000" / "adapter") == adapter_hash(rl / "versions" / "00001" / "adapter")


def test_rl_stage_refuses_an_offline_trainer():
    from selfimprove.config import ConfigError

    with pytest.raises(ConfigError, match="offline trainer"):
        load_pipeline(TINY_GRPO, ["stages.rl.trainer={name: sft}"])
    with pytest.raises(ConfigError, match="sampling.n >= 2"):
        load_pipeline(TINY_GRPO, ["stages.rl.sampling={n: 1, temperature: 1.0}"])


def test_rollouts_up_to_max_staleness_versions_old_are_trained_on(tiny_model, tmp_path):
    trainer = PolicyGradient(PolicyGradient.Config(learning_rate=1e-2, lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    trainer.setup(tiny_model, None, seed=0)
    v0 = trainer.save(tmp_path / "v0")

    def rollouts(version):
        return [Rollout("g", [PROMPT], [text], [True], [reward], version) for text, reward in (("5", 1.0), ("7", 0.0))]

    trainer.step(rollouts(v0), [0.0], 1.0, 8)
    v1 = trainer.save(tmp_path / "v1")
    with pytest.raises(StalePolicyError, match="resample"):
        trainer.step(rollouts(v0), [0.0], 1.0, 8)  # on-policy: one version old is stale
    assert trainer.step(rollouts(v0), [0.0], 1.0, 8, max_staleness=1)["grad_norm"] > 0
    v2 = trainer.save(tmp_path / "v2")
    with pytest.raises(StalePolicyError, match="at most 1 older"):
        trainer.step(rollouts(v0), [0.0], 1.0, 8, max_staleness=1)  # two versions old
    assert len({v0, v1, v2}) == 3
    # resumed from v2, the trainer still accepts v1's rollouts when the stage says v1 came before it
    resumed = PolicyGradient(PolicyGradient.Config(learning_rate=1e-2, lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    resumed.setup(tiny_model, None, seed=0, state=tmp_path / "v2", earlier=[v1])
    with pytest.raises(StalePolicyError):
        resumed.step(rollouts(v0), [0.0], 1.0, 8, max_staleness=1)
    assert resumed.step(rollouts(v1), [0.0], 1.0, 8, max_staleness=1)["grad_norm"] > 0


def test_async_generation_samples_each_step_one_version_behind_and_resumes_identically(engine, tmp_path):
    """max_staleness 1: step s samples with version max(0, s - 1) (sampled while step s - 1 trains); cut back to
    the state after step 1 (as a kill during step 2 leaves it) and re-run: step 2 is sampled again with version 1,
    not the newest, and the stage ends with the same policy."""
    overrides = ["rounds=1", "evaluate_base=false", "stages.rl.steps=3", "stages.rl.max_staleness=1"]
    run_dir = tmp_path / "run"
    Runner(load_pipeline(TINY_GRPO, overrides), run_dir, engine=engine, log=quiet).run()
    rl = run_dir / "round_001" / "rl"
    versions = [adapter_hash(rl / "versions" / f"{v:05d}" / "adapter") for v in range(4)]
    assert len(set(versions)) == 4
    rows = load_rows(rl / "data")
    for step, version in ((0, 0), (1, 0), (2, 1)):
        assert {row["weights"]["adapter_hash"] for row in rows if row["step"] == step} == {versions[version]}
    steps = [read_json(rl / "versions" / f"{v:05d}" / "step.json") for v in (1, 2, 3)]
    assert [s["staleness"] for s in steps] == [0, 1, 1]
    assert [s["policy_version"] for s in steps] == [versions[0], versions[0], versions[1]]
    want = adapter_hash(rl / "adapter")

    for name in ("manifest.json", "weights.json"):
        (rl / name).unlink()
    for name in ("adapter", "data", "versions/00003"):
        shutil.rmtree(rl / name)
    shutil.rmtree(run_dir / "round_001" / "evaluate")
    Runner(load_pipeline(TINY_GRPO, overrides), run_dir, engine=engine, log=quiet).run()
    assert adapter_hash(rl / "adapter") == want
    assert load_rows(rl / "data") == rows
