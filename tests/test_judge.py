"""A judge that learns (stages/judge.py): label-free pairs, the judgements it got right as its training rows, its
quality on dev pairs, and its own adapter beside the policy's in a run."""

import random

import pytest

from selfimprove.artifacts import load_rows, read_json
from selfimprove.config import ConfigError
from selfimprove.critics import CriticContext
from selfimprove.critics.self_verify import SelfVerifyCritic, yes_probability
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.records import Weights
from selfimprove.shipped import root
from selfimprove.stages.judge import compare_to_base, judge_metrics, judgement_rows, perturb_question
from selfimprove.tasks.arithmetic import Arithmetic


def quiet(*_):
    pass


def test_perturb_question_changes_one_digit_and_never_leads_with_zero():
    for seed in range(300):
        out = perturb_question("What is 37 + 58?", random.Random(seed))
        diff = [i for i, (a, b) in enumerate(zip("What is 37 + 58?", out)) if a != b]
        assert len(out) == len("What is 37 + 58?") and len(diff) == 1 and out[diff[0]].isdigit()
        assert out[8] != "0" and out[13] != "0"  # the leading digits of 37 and 58
    assert perturb_question("What is 0 + 0?", random.Random(1)) in {f"What is {a} + {b}?" for a, b in
                                                                   [(d, 0) for d in range(1, 10)] + [(0, d) for d in
                                                                                                   range(1, 10)]}
    assert perturb_question("Add seven and eight.", random.Random(0)) is None


def sample(sid, completion):
    return {"sample_id": sid, "problem_id": "p", "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
            "completion": completion}


def test_judgement_rows_keep_only_pairs_the_judge_ranked_right():
    judge = SelfVerifyCritic(SelfVerifyCritic.Config(), CriticContext(task=None))
    pairs = [(sample(f"g{i}", "The answer is 4."), sample(f"b{i}", "The answer is 5.")) for i in range(3)]
    rows = judgement_rows(pairs, [(0.9, 0.2), (0.4, 0.4), (0.1, 0.8)], judge, "judge_data")
    assert [(r["sample_ids"], r["completion"][0]["content"]) for r in rows] == [(["g0"], "Yes"), (["b0"], "No")]
    assert rows[1]["prompt"] == [{"role": "user", "content": "What is 2 + 2?"},
                                 {"role": "assistant", "content": "The answer is 5."},
                                 {"role": "user", "content": "Is the answer above correct? Answer Yes or No."}]


def test_judge_metrics_by_hand():
    task = Arithmetic(Arithmetic.Config(num_train=10, num_test=3, num_dev=3))
    right = {"question": "2 + 2", "answer": "4", "completion": "The answer is 4."}
    wrong = {"question": "2 + 3", "answer": "5", "completion": "The answer is 6."}
    pairs = [(right, {}), (wrong, {}), (right, {})]
    m = judge_metrics(pairs, [(0.9, 0.1), (0.6, 0.7), (0.5, 0.5)], task)
    assert m["judge/pair_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    # better sides 0.9, 0.6, 0.5 against worse 0.1, 0.7, 0.5: 3 + 2 + 1.5 wins of 9
    assert m["judge/auroc"] == pytest.approx(6.5 / 9)
    # gold: the answers scored 0.9 and 0.5 are right, 0.6 is wrong: 0.9 beats it, 0.5 does not
    assert m["judge/gold_auroc"] == pytest.approx(0.5) and m["judge/gold_accuracy"] == pytest.approx(2 / 3)
    no_gold = [({**right, "answer": ""}, {})] * 2
    assert judge_metrics(no_gold, [(0.9, 0.1), (0.2, 0.3)], task)["judge/gold_auroc"] is None


def test_compare_to_base_by_hand():
    trained = [(0.9, 0.1), (0.6, 0.7), (0.5, 0.5)]  # ranks pair 1 right (strictly)
    base = [(0.2, 0.8), (0.6, 0.7), (0.9, 0.1)]  # ranks pair 3 right
    m = compare_to_base(trained, base)
    assert m["judge/base_auroc"] == pytest.approx(5 / 9)  # 0.2 beats 0.1; 0.6 beats 0.1; 0.9 beats all three
    assert m["judge/vs_base_difference"] == 0 and m["judge/vs_base_p"] == 1.0  # one discordant pair each way
    better = compare_to_base([(0.9, 0.1)] * 8, [(0.1, 0.9)] * 8)
    assert better["judge/vs_base_difference"] == 1 and better["judge/vs_base_p"] == pytest.approx(2 / 2 ** 8)


def test_judge_adapter_is_its_own_and_never_the_policy(engine, tiny_model, tmp_path):
    """The shipped quick start, two rounds: judge_data measures with last round's judge (the base in round 1), the
    judge trains an adapter of its own, the critique scores with this round's judge, and the policy (generate, DPO's
    start and reference) never comes from the judge."""
    run = tmp_path / "judge"
    Runner(load_pipeline(root() / "pipelines" / "tiny_self_rewarding_judge.yaml"), run, engine=engine, log=quiet).run()
    manifest = {(r, s): read_json(run / f"round_{r:03d}" / s / "manifest.json")["metrics"]
                for r in (1, 2) for s in ("judge_data", "generate")}
    assert manifest[1, "judge_data"]["judge_weights"] == "base"
    assert manifest[2, "judge_data"]["judge_weights"] == "round_001/judge_train"
    assert manifest[2, "judge_data"]["measured"] == 6 and 0 <= manifest[2, "judge_data"]["judge/auroc"] <= 1
    # the base judge on the same dev pairs, beside a trained judge only
    assert "judge/base_auroc" not in manifest[1, "judge_data"] and 0 <= manifest[2, "judge_data"]["judge/base_auroc"]
    kept = load_rows(run / "round_002" / "judge_data" / "pairs")
    assert [r["measured"] for r in kept] == [True] * 6 + [False] * 6
    # the worse side answered another question than the one in the pair's prompt
    assert all(r["perturbed_question"] not in r["prompt"][-1]["content"] for r in kept)
    assert all(0 <= r["better_score"] <= 1 and 0 <= r["worse_score"] <= 1 for r in kept)
    judge, policy = (read_json(run / "round_002" / s / "weights.json") for s in ("judge_train", "train"))
    assert judge["adapter_hash"] != policy["adapter_hash"] and judge["init"]["label"] == "base"
    assert policy["init"]["label"] == "round_001/train" == policy["policy"]["label"]
    samples = load_rows(run / "round_002" / "generate" / "data")
    assert {s["weights"]["label"] for s in samples} == {"round_001/train"}
    # The critique's P(Yes) is the judge adapter's, not the sample's weights'.
    verdicts = [v for v in load_rows(run / "round_002" / "critique" / "data") if v["critic"] == "judge"]
    assert all(v["rationale"].endswith("by round_002/judge_train") for v in verdicts)
    by_id = {s["sample_id"]: s for s in samples}
    critic = SelfVerifyCritic(SelfVerifyCritic.Config(), CriticContext(task=None))
    prompts = [critic.conversation(by_id[v["sample_id"]]) for v in verdicts[:4]]
    for name, weights in (("judge", Weights.from_dict(judge)), ("policy", Weights.from_dict(policy["init"]))):
        scores = [yes_probability(lp, "Yes", "No") for lp in engine.choice_logprobs(prompts, ["Yes", "No"], weights)]
        close = all(abs(s - v["score"]) < 1e-5 for s, v in zip(scores, verdicts))
        assert close == (name == "judge"), name


def test_judge_config_errors_name_the_field(tmp_path):
    base = root() / "pipelines" / "tiny_self_rewarding_judge.yaml"
    bad = {
        "stages.critique.critics=[{name: self_verify, id: judge, weights: evaluate}]": "'evaluate' is not base",
        "stages.judge_data.weights=generate": "judge_data.weights: 'generate' is not base, policy, latest or a weights-producing",
        "stages.judge_data.measure.split=train": "measure.split and problems.split are both 'train'",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_pipeline(base, [override])


def test_a_judge_trained_after_the_policy_never_becomes_the_policy(tmp_path):
    """With the judge's stages at the end of the round (after the policy's train stage), `policy` and `latest` still
    pass the judge's adapter by, and `weights: judge_train` before it in the round means last round's judge."""
    from selfimprove.artifacts import write_json
    from selfimprove.yamlio import load_yaml

    data = load_yaml(root() / "pipelines" / "tiny_self_rewarding_judge.yaml")
    stages = data["stages"]
    stages["critique"]["critics"] = [{"name": "self_verify", "id": "judge"}, {"name": "answer"}]
    data["stages"] = {k: stages[k] for k in ("generate", "critique", "pairs", "train", "judge_data", "judge_train",
                                             "evaluate")}
    runner = Runner(load_pipeline(None, data=data), tmp_path, log=quiet)
    runner.base_model = "base-model"
    for name in ("train", "judge_train"):
        write_json(runner.stage_dir(1, name) / "weights.json", {"base": "base-model", "adapter": f"/a/{name}",
                                                               "label": f"round_001/{name}", "adapter_hash": name})
        write_json(runner.stage_dir(1, name) / "manifest.json", {"done": True})
    assert runner.weights(2, "policy", "generate").label == "round_001/train"
    assert runner.weights(1, "latest", "evaluate").label == "round_001/train"
    assert runner.weights(2, "judge_train", "judge_data").label == "round_001/judge_train"
    assert runner.weights(1, "judge_train", "generate").label == "base"
