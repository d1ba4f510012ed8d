"""Process rewards, part 1-2: steps, arithmetic's exact step oracle, Monte-Carlo step labels (Math-Shepherd) and
their agreement with the oracle. Hand-worked cases on in-memory data and a scripted engine whose rollout outcomes
are known; one run of the stage on the tiny random model end to end."""

from __future__ import annotations

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
