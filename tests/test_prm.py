"""Process rewards: steps, arithmetic's exact step oracle, Monte-Carlo step labels (Math-Shepherd) and their
agreement with the oracle (parts 1-2); the process reward model, its stage and its critic (part 3). Hand-worked
cases on in-memory data and a scripted engine whose rollout outcomes are known; the tiny random model for label
placement, fitting and resuming; the step-label stage and the PRM pipeline on it end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, save_rows, write_json
from selfimprove.config import build
from selfimprove.records import Completion, Weights
from selfimprove.registry import STAGES
from selfimprove.stages.step_labels import StepLabels
from selfimprove.step_labels import chat_continuation, mc_step_labels, oracle_agreement, prefix_verdicts
from selfimprove.records import SamplingConfig
from selfimprove.tasks.arithmetic import Arithmetic, scratchpad
from selfimprove.tasks.gsm8k import GSM8K
from tests.kill_in_step import hang_in_step, kill_in_step

TASK = Arithmetic(Arithmetic.Config(num_train=40, num_test=12, num_dev=12))
# 157 + 268: 7 + 8 = 15 (write 5, carry 1); 5 + 6 + 1 = 12 (write 2, carry 1); 1 + 2 + 1 = 4; 425.
PROBLEM = {"problem_id": "p", "question": "157 + 268", "answer": "425", "digits": 3}
GOLD = ("7 + 8 = 15, write 5, carry 1.\n5 + 6 + 1 = 12, write 2, carry 1.\n1 + 2 + 1 = 4, write 4.\n"
        "The answer is 425.")
# Column 2 drops its carry; column 3 then adds the carry it was told (none) and the answer follows it.
WRONG_CARRY = "7 + 8 = 15, write 5, carry 1.\n5 + 6 + 1 = 12, write 2.\n1 + 2 = 3, write 3.\nThe answer is 325."


# -- steps and the exact oracle ---------------------------------------------------------------------------------------
def test_steps_are_non_empty_lines():
    assert TASK.steps(GOLD) == GOLD.split("\n")
    assert TASK.steps("  a \n\n b\n") == ["a", "b"]
    gsm = GSM8K(GSM8K.Config(num_dev=0))
    assert gsm.steps("She has 3.\n\nShe buys 2, so 5.\nThe answer is 5.") == [
        "She has 3.", "She buys 2, so 5.", "The answer is 5."]
    assert gsm.step_verdicts({}, "x") is None  # no exact oracle outside arithmetic


def test_gold_scratchpads_are_right_at_every_step():
    assert TASK.step_verdicts(PROBLEM, GOLD) == [True] * 4
    for p in TASK.problems("test") + [{"question": "99 + 1", "answer": "100"}, {"question": "5 + 7", "answer": "12"}]:
        a, b = map(int, p["question"].split(" + "))
        verdicts = TASK.step_verdicts(p, scratchpad(a, b))
        assert verdicts and all(verdicts), (p["question"], scratchpad(a, b))
    # 99 + 1 has a shorter operand (0 past its digits) and a leading carry line
    assert TASK.steps(scratchpad(99, 1))[-2] == "The carry 1 is the leading digit."


def test_a_wrong_carry_is_wrong_from_exactly_its_step():
    assert TASK.step_verdicts(PROBLEM, WRONG_CARRY) == [True, False, False, False]
    assert prefix_verdicts(TASK.step_verdicts(PROBLEM, WRONG_CARRY)) == [True, False, False, False]
    # A wrong digit in column 2 whose carry is still right: column 3 is right on its own, but its prefix is not.
    wrong_digit = GOLD.replace("write 2, carry 1", "write 3, carry 1").replace("425", "435")
    assert TASK.step_verdicts(PROBLEM, wrong_digit) == [True, False, True, False]
    assert prefix_verdicts(TASK.step_verdicts(PROBLEM, wrong_digit)) == [True, False, False, False]


def test_malformed_and_misplaced_lines_are_wrong():
    text = ("Let me add.\n7+8=15, write 5, carry 1.\n7 + 8 = 15, write 5, carry 1.\n8 + 7 = 15, write 5, carry 1.\n"
            "The carry 1 is the leading digit.\nThe answer is 425.")
    # prose; no spaces; column 1 right; column 2 repeats column 1's digits; a leading carry before the last column
    assert TASK.step_verdicts(PROBLEM, text) == [False, False, True, False, False, True]
    # operands in either order, an explicit "+ 0" carry, no carry written on a sum below 10
    assert TASK.step_verdicts({"question": "12 + 34", "answer": "46"},
                              "4 + 2 + 0 = 6, write 6.\n3 + 1 = 4, write 4, carry 0.\nThe answer is 46.") == [
        True, False, True]


# -- Monte-Carlo labels on a scripted engine -----------------------------------------------------------------------
class TemplateTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class ScriptedEngine:
    """Rolls out `right[number of steps in the prefix]` right answers out of n (from the first), wrong ones after;
    records its calls."""

    def __init__(self, right: dict[int, int]):
        self.right, self.calls = right, []
        self.tokenizer = TemplateTokenizer()

    def generate(self, prompts, sampling, weights, seed):
        self.calls.append((list(prompts), sampling.n))
        out = []
        for prompt in prompts:
            prefix = prompt.split("<assistant>", 1)[1]
            right = self.right[len(prefix.strip().split("\n"))]
            out.append([Completion("The answer is 425." if k < right else "The answer is 7.", "stop", 5)
                        for k in range(sampling.n)])
        return out


def sample(sample_id: str, completion: str) -> dict:
    return {**PROBLEM, "sample_id": sample_id, "prompt": TASK.prompt(PROBLEM), "completion": completion}


def test_mc_labels_are_the_fraction_of_rollouts_that_reach_the_answer():
    engine = ScriptedEngine({1: 3, 2: 1, 3: 0})
    rows = mc_step_labels(engine, TASK, [sample("a", GOLD), sample("b", WRONG_CARRY)], 4, SamplingConfig(temperature=1.0),
                          Weights("m"), 0, chat_continuation(engine.tokenizer))
    [(prompts, n)] = engine.calls  # one batched call: 3 non-final prefixes per sample, K = 4 each
    assert n == 4 and len(prompts) == 6
    assert prompts[1].endswith("<assistant>7 + 8 = 15, write 5, carry 1.\n5 + 6 + 1 = 12, write 2, carry 1.\n")
    assert prompts[0].startswith("<user>Add the two numbers")
    a, b = rows
    assert a["outcomes"] == [[True, True, True, False], [True, False, False, False], [False] * 4, []]
    assert a["soft"] == [0.75, 0.25, 0.0, 1.0] and a["hard"] == [True, True, False, True]  # last: its own grade
    assert b["soft"] == [0.75, 0.25, 0.0, 0.0] and b["hard"] == [True, True, False, False]
    assert a["oracle"] == [True] * 4 and b["oracle"] == [True, False, False, False]
    # rolled-out steps vs oracle: a: T,T,F vs T,T,T; b: T,T,F vs T,F,F (hard@4: 4 of 6 agree)
    agreement = oracle_agreement(rows)
    assert agreement["agreement/steps"] == 6
    assert agreement["agreement/hard@4"] == pytest.approx(4 / 6)
    assert agreement["agreement/soft@4"] == pytest.approx(4 / 6)  # soft >= 0.5: T,F,F and T,F,F
    # K' = 1: the first rollout only (right for 1- and 2-step prefixes): same as hard@4 here
    assert agreement["agreement/hard@1"] == pytest.approx(4 / 6)
    assert agreement["agreement/soft@2"] == pytest.approx(4 / 6)  # 1-step: 2/2, 2-step: 1/2 → T,T,F


def test_agreement_by_k_uses_the_first_k_rollouts():
    rows = [{"outcomes": [[False, True], [False, False], []], "oracle": [True, False, False]}]
    assert oracle_agreement(rows) == {"agreement/steps": 2, "agreement/hard@1": 0.5, "agreement/soft@1": 0.5,
                                      "agreement/hard@2": 1.0, "agreement/soft@2": 1.0}
    assert oracle_agreement([{"outcomes": [[True]], "oracle": None}]) == {}


class Context:
    def __init__(self, root, engine, base_model="model"):
        self.round, self.stage, self.task, self.base_model = 1, "step_labels", TASK, base_model
        self.out_dir, self._root, self._engine = root / "step_labels", root, engine

    def seed(self, *parts):
        return len(str(parts))

    def engine(self):
        return self._engine

    def weights(self, which):
        return Weights(self.base_model)

    def input_dir(self, stage):
        return self._root / stage


def test_the_stage_writes_labelled_rows_and_resumes_from_its_shards(tmp_path):
    assert STAGES.get("step_labels") is StepLabels
    save_rows([sample("a", GOLD), {**sample("b", WRONG_CARRY), "problem_id": "q"}], tmp_path / "generate" / "data")
    write_json(tmp_path / "generate" / "manifest.json", {"done": True})
    config = build(StepLabels.Config, {"rollouts": 2, "sampling": {"temperature": 1.0}, "chunking": {"size": 1}},
                   "test")
    engine = ScriptedEngine({1: 2, 2: 1, 3: 0})
    metrics = StepLabels(config, Context(tmp_path, engine)).run()
    rows = load_rows(tmp_path / "step_labels" / "data")
    assert [r["sample_id"] for r in rows] == ["a", "b"] and len(engine.calls) == 2  # one call per chunk
    assert rows[1]["soft"] == [1.0, 0.5, 0.0, 0.0] and rows[1]["oracle"] == [True, False, False, False]
    assert metrics["samples"] == 2 and metrics["steps"] == 8 and metrics["rollouts"] == 12
    assert metrics["agreement/hard@2"] == pytest.approx(4 / 6)
    # a rerun finds both shards and rolls nothing out
    again = ScriptedEngine({})
    assert StepLabels(config, Context(tmp_path, again)).run() == metrics and again.calls == []


def test_config_refuses_greedy_rollouts():
    with pytest.raises(Exception, match="temperature 0"):
        build(StepLabels.Config, {"rollouts": 4, "sampling": {"temperature": 0.0}}, "test")


def test_the_stage_on_the_tiny_model_end_to_end(tmp_path, tiny_model):
    """The tiny random model's rollouts are noise: this checks the plumbing (chat continuation, tokenization,
    grading, the dataset), not the labels, whose agreement with the oracle means nothing here."""
    from selfimprove.engines.hf_engine import HFEngine

    problems = TASK.problems("test")[:2]
    samples = [{**p, "sample_id": f"s{i}", "prompt": TASK.prompt(p), "completion": p["solution"]}
               for i, p in enumerate(problems)]
    save_rows(samples, tmp_path / "generate" / "data")
    config = build(StepLabels.Config, {"rollouts": 2, "sampling": {"temperature": 1.0, "max_tokens": 8}}, "test")
    engine = HFEngine(HFEngine.Config(dtype="float32", device="cpu"), tiny_model)
    metrics = StepLabels(config, Context(tmp_path, engine, tiny_model)).run()
    rows = load_rows(tmp_path / "step_labels" / "data")
    assert [r["steps"] for r in rows] == [TASK.steps(p["solution"]) for p in problems]
    for r in rows:
        assert [len(o) for o in r["outcomes"]] == [2] * (len(r["steps"]) - 1) + [0]
        assert r["oracle"] == [True] * len(r["steps"]) and r["hard"][-1] is True  # gold scratchpads
    assert metrics["rollouts"] == 2 * sum(len(r["steps"]) - 1 for r in rows)
    assert 0.0 <= metrics["agreement/hard@2"] <= 1.0


# -- part 3: the process reward model --------------------------------------------------------------------------------
def test_aggregates_by_hand():
    from selfimprove.prm import aggregate

    steps = [0.9, 0.2, 0.8]
    assert aggregate(steps, "min") == 0.2
    assert aggregate(steps, "prod") == pytest.approx(0.144)  # 0.9 * 0.2 = 0.18; * 0.8 = 0.144
    assert aggregate(steps, "last") == 0.8


def test_the_critic_aggregates_and_keeps_the_step_scores():
    from selfimprove.critics.base import CriticContext
    from selfimprove.critics.prm import PRMCritic

    critic = PRMCritic(build(PRMCritic.Config, {"weights": "train_prm", "aggregate": "prod"}, "test"),
                       CriticContext(task=TASK))  # the model loads on the first judge() only
    verdict = critic.verdict([0.9, 0.2, 0.8])
    assert verdict.score == pytest.approx(0.144) and verdict.label is False and verdict.error is None
    assert verdict.rationale == "prod 0.1440 of step scores [0.9000, 0.2000, 0.8000]"
    assert critic.verdict([]).error == "the response has no steps" and critic.verdict([]).score is None
    assert "cut off 1 of 2 steps" in critic.verdict([None, 0.7]).error
    with pytest.raises(Exception, match="weights"):
        build(PRMCritic.Config, {"aggregate": "min"}, "test")  # which PRM is not optional
    with pytest.raises(Exception, match="aggregate"):
        build(PRMCritic.Config, {"weights": "train_prm", "aggregate": "mean"}, "test")


def test_labels_sit_on_the_last_token_of_each_step(tiny_model):
    from selfimprove.prm import encode, load_tokenizer, training_example

    tokenizer = load_tokenizer(tiny_model)
    prompt = [{"role": "user", "content": "1 + 2"}]
    example = training_example(tokenizer, prompt, ["a b.", "c d."], [1.0, 0.0], max_length=1024)
    ids, labels = example["input_ids"], example["labels"]
    # the chat template's 34 tokens end "...<|im_start|>assistant\n"; then "a b.\nc d." is 7 tokens: a step's last
    # token is its full stop, and the newline between steps carries no label
    assert len(ids) == 41
    assert tokenizer.convert_ids_to_tokens(ids)[30:] == ["<|im_start|>", "ass", "istant", "Ċ", "a", "Ġb", ".", "Ċ",
                                                         "c", "Ġd", "."]
    assert {i: label for i, label in enumerate(labels) if label != -100} == {36: 1.0, 40: 0.0}
    # truncation keeps the end: 5 tokens still hold both steps' ends, 3 only the second's
    assert encode(tokenizer, prompt, ["a b.", "c d."], 5) == (ids[-5:], [0, 4])
    assert encode(tokenizer, prompt, ["a b.", "c d."], 3) == (ids[-3:], [None, 2])
    # a text prompt is extended as it is, with no template around it
    text_ids, positions = encode(tokenizer, "Q: 1 + 2\nA: ", ["a b.", "c d."], 1024)
    assert tokenizer.decode(text_ids) == "Q: 1 + 2\nA: a b.\nc d."
    assert positions == [len(text_ids) - 5, len(text_ids) - 1]


# Per sum: a first step always right, a second right for odd a only, a last always wrong.
PRM_EXAMPLES = [{"prompt": [{"role": "user", "content": f"{a} + {a}"}],
                 "steps": [f"{a} and {a}.", f"so {2 * a}.", "done."], "targets": [1.0, float(a % 2), 0.0]}
                for a in range(6)]


def prm_settings(**optim):
    from selfimprove.prm import PrmTraining
    from selfimprove.trainers.common import LoraSettings, Optimization

    return PrmTraining(lora=LoraSettings(r=4, alpha=8, dropout=0.1),
                       optim=Optimization(**{"learning_rate": 1e-2, "batch_size": 6, "logging_steps": 1, **optim}))


def test_a_tiny_prm_fits_a_handful_of_labels(tiny_model, tmp_path):
    from selfimprove.metrics import auroc_interval
    from selfimprove.prm import ProcessRewardModel, train

    metrics = train(PRM_EXAMPLES, tiny_model, tmp_path / "adapter", tmp_path / "work", seed=0,
                    settings=prm_settings(max_steps=30, checkpoint_every=0))
    assert metrics["examples"] == 6 and metrics["labelled_steps"] == 18 and metrics["steps"] == 30
    assert metrics["final_loss"] < metrics["first_loss"] / 4  # from ~log 2
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and "score" in config["modules_to_save"]  # the head is in the adapter
    prm = ProcessRewardModel(tiny_model, str(tmp_path / "adapter"), max_length=1024, device="cpu")
    scores = prm.step_scores([e["prompt"] for e in PRM_EXAMPLES], [e["steps"] for e in PRM_EXAMPLES], batch_size=4)
    assert [len(s) for s in scores] == [3] * 6
    flat, targets = [s for ss in scores for s in ss], [t == 1.0 for e in PRM_EXAMPLES for t in e["targets"]]
    assert auroc_interval(flat, targets)[0] == 1.0  # every right step above every wrong one
    assert [s >= 0.5 for s in flat] == targets
    # one batch or several: the same scores (right padding moves no step)
    assert prm.step_scores([PRM_EXAMPLES[3]["prompt"]], [PRM_EXAMPLES[3]["steps"]], 1)[0] == pytest.approx(
        scores[3], abs=1e-5)


def _train_prm(tiny_model: str, work: Path) -> dict:
    from selfimprove.prm import train

    return train(PRM_EXAMPLES, tiny_model, work.parent / "adapter", work, seed=0,
                 settings=prm_settings(max_steps=5, batch_size=2, checkpoint_every=2, learning_rate=1e-3))


def test_a_killed_prm_training_resumes_to_the_same_adapter(tiny_model, tmp_path):
    """6 examples in batches of 2, 5 steps, a checkpoint every 2, dropout on: killed (SIGKILL) in step 5, then
    run again on the same work folder, it ends with the uninterrupted run's adapter, bit for bit."""
    import torch
    from safetensors.torch import load_file

    full = _train_prm(tiny_model, tmp_path / "full" / "work")
    killed = tmp_path / "killed" / "work"
    killed.mkdir(parents=True)
    ready, log = tmp_path / "killed" / "ready", tmp_path / "killed" / "log"
    kill_in_step("tests.test_prm", [tiny_model, str(killed)], ready, log)
    assert not (tmp_path / "killed" / "adapter").exists()
    resumed = _train_prm(tiny_model, killed)
    assert full["resumed_from_step"] == 0 and resumed["resumed_from_step"] == 4 and resumed["steps"] == 5
    a, b = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (tmp_path / "full", tmp_path / "killed"))
    assert a.keys() == b.keys() and any("score" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), {k: (a[k] - b[k]).abs().max().item() for k in a}


def test_held_out_problems_take_every_sample_of_a_problem():
    from selfimprove.stages.prm import held_out_problems

    ids = ["a", "a", "b", "b", "c", "d", "e"]
    held = held_out_problems(ids, 0.4, seed=3)
    assert len(held) == 2 and held <= set(ids)  # 0.4 of 5 problems
    assert held == held_out_problems(ids, 0.4, seed=3)
    assert held_out_problems(ids, 0.0, seed=3) == set() and len(held_out_problems(ids, 0.01, seed=3)) == 1
    with pytest.raises(ValueError, match="none to train on"):
        held_out_problems(["a", "b"], 0.9, seed=0)


def test_step_metrics_by_hand():
    from selfimprove.stages.prm import step_metrics

    rows = [{"hard": [True, False], "soft": [0.75, 0.0], "oracle": [True, False]},
            {"hard": [True, True, False], "soft": [0.5, 0.25, 0.0], "oracle": None}]
    scores = [[0.9, 0.3], [0.6, 0.25, 0.2]]
    m = step_metrics(rows, scores, "hard")
    # right: 0.9, 0.6, 0.25; wrong: 0.3, 0.2. At 0.5 all but 0.25 are classed right: 4 of 5. Of the 6 (right,
    # wrong) pairs only 0.25 < 0.3 is in the wrong order: AUROC 5/6.
    assert m["held_out/steps"] == 5 and m["held_out/positive_rate"] == pytest.approx(0.6)
    assert m["held_out/step_accuracy"] == pytest.approx(0.8)
    assert m["held_out/step_auroc"] == pytest.approx(5 / 6)
    # the oracle: on the first row only, both steps ranked and classed right; one of each: no interval
    assert m["held_out/oracle_steps"] == 2 and m["held_out/oracle_step_accuracy"] == 1.0
    assert m["held_out/oracle_step_auroc"] == 1.0 and m["held_out/oracle_step_auroc_ci_low"] is None
    # soft labels count as right at >= 0.5: 0.75, 0.5 (scores 0.9, 0.6) against 0.0, 0.25, 0.0 (0.3, 0.25, 0.2)
    soft = step_metrics(rows, scores, "soft")
    assert soft["held_out/step_auroc"] == 1.0 and soft["held_out/step_accuracy"] == 1.0
    # a step truncation cut off has no score and is left out
    assert step_metrics(rows, [[0.9, None], [0.6, 0.25, 0.2]], "hard")["held_out/steps"] == 4


def test_the_tiny_prm_pipeline_end_to_end(engine, tmp_path):
    """generate → step_labels → train_prm → generate_test → critique with the prm critic, on the tiny random
    model: the plumbing (the adapter, its held-out scores, the critic reading it), not the PRM's quality."""
    from selfimprove.artifacts import read_json
    from selfimprove.pipeline import Runner, load_pipeline

    run = tmp_path / "run"
    Runner(load_pipeline(Path(__file__).parent / "pipelines" / "tiny_prm.yaml"), run, engine=engine,
           log=lambda *_: None).run()
    stage = run / "round_001" / "train_prm"
    metrics = read_json(stage / "manifest.json")["metrics"]
    assert json.loads((stage / "adapter" / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"
    weights = read_json(stage / "weights.json")
    assert weights["adapter"] == str(stage / "adapter") and weights["adapter_hash"]
    assert metrics["held_out/problems"] == 2 and metrics["steps"] == 3  # 0.34 of 6 problems; max_steps
    held = load_rows(stage / "held_out")
    assert len(held) == metrics["held_out/samples"] and len({r["problem_id"] for r in held}) == 2
    assert all(len(r["scores"]) == len(r["steps"]) and all(0 < s < 1 for s in r["scores"]) for r in held)
    assert metrics["held_out/steps"] == sum(len(r["steps"]) for r in held)
    # the PRM is never the policy: the test answers come from the base model
    tests = load_rows(run / "round_001" / "generate_test" / "data")
    assert {r["weights"]["label"] for r in tests} == {"base"}
    verdicts = [r for r in load_rows(run / "round_001" / "critique" / "data") if r["critic"] == "prm"]
    assert len(verdicts) == len(tests)
    for v in verdicts:
        if v["error"] is None:  # min of the step scores it lists
            steps = [float(x) for x in v["rationale"].split("[")[1].rstrip("]").split(", ")]
            assert v["score"] == pytest.approx(min(steps), abs=1e-4) and v["label"] == (v["score"] >= 0.5)
    assert sum(v["error"] is None for v in verdicts) > 0


def test_a_prm_adapter_is_named_only_where_process_rewards_are_read():
    """A train_prm stage's adapter is a token-classification head: a generating stage or a yes/no judge naming it
    is refused at load, and the prm critic must name a train_prm stage, not a language model's stage."""
    from selfimprove.config import ConfigError
    from selfimprove.pipeline import load_pipeline

    base = Path(__file__).parent / "pipelines" / "tiny_prm.yaml"
    load_pipeline(base, [])  # the shipped shape loads
    bad = {
        "stages.generate_test.weights=train_prm": "generate_test.weights: 'train_prm' is a train_prm stage",
        "stages.critique.critics=[{name: self_verify, weights: train_prm}]": "'self_verify'.*'train_prm' is a "
                                                                            "train_prm stage",
        "stages.critique.critics=[{name: prm, weights: generate}]": "'generate' is not an earlier train_prm stage",
        "stages.critique.critics=[{name: prm, weights: base}]": "'base' is not an earlier train_prm stage",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_pipeline(base, [override])


if __name__ == "__main__":  # the child process of the resume test: the same training, killed in step 5
    tiny_model, work, ready = sys.argv[1:]
    hang_in_step(ready)
    _train_prm(tiny_model, Path(work))
