"""Label-free signals: the majority critic's per-batch stats and saturation warning (TTRL), the likelihood
critic (Sharpening), best-of-N selection, and a tiny RL run rewarded by majority vote."""

from __future__ import annotations

import logging

import pytest

from selfimprove.artifacts import load_rows, read_json
from selfimprove.critics import CriticContext
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.records import Weights
from selfimprove.registry import CriticSpec
from selfimprove.stages.rl import RL
from tests.test_critics import GSM, sample
from tests.test_rl import TINY_GRPO, quiet
from tests.test_verdicts import critique_then, run_filter, samples_of

from .conftest import TARGET


def build(spec: dict, engine=None, weights=None, task=GSM):
    context = CriticContext(task=task, engine=lambda: engine, weights=weights or Weights("model"))
    return CriticSpec.from_config(spec, "test", "critic").build(context)


# -- majority: what TTRL logs per step -------------------------------------------------------------------------
def test_majority_stats_on_a_hand_worked_batch():
    batch = [sample("p", t, "5", k) for k, t in enumerate(
        ["The answer is 5.", "The answer is 5.", "The answer is 7.", "I give up"])]  # 5 wins 2/4: right
    batch += [sample("q", t, "3", k) for k, t in enumerate(
        ["The answer is 4.", "The answer is 4.", "The answer is 3."])]  # 4 wins 2/3: wrong
    batch += [sample("r", "The answer is 1.", None, 0)]  # no gold: counts for the ratio only
    critic = build({"name": "majority"})
    verdicts = critic.judge(batch)
    assert [v.label for v in verdicts] == [True, True, False, False, True, True, False, True]
    stats = critic.stats(batch, verdicts)
    assert stats["majority_ratio"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert stats["label_accuracy"] == 0.5  # p's pseudo-label is gold, q's is not
    assert stats["reward_accuracy"] == pytest.approx(4 / 7)  # all of p's rewards match gold, none of q's
    assert stats["saturated"] == 0.0


def test_majority_saturation_warns_after_k_batches_in_a_row(caplog):
    critic = build({"name": "majority", "saturation": 0.9, "saturation_steps": 2})
    unanimous = [sample("p", "The answer is 5.", "5", k) for k in range(3)]
    split = [sample("p", f"The answer is {k}.", "5", k) for k in range(2)]
    seen = []
    with caplog.at_level(logging.WARNING, logger="selfimprove.critics.majority"):
        for batch in (unanimous, unanimous, unanimous, split, unanimous):
            seen.append((critic.stats(batch, critic.judge(batch))["saturated"], "saturated" in caplog.text))
    # fires from the second unanimous batch on; a split vote resets the count
    assert seen == [(0.0, False), (1.0, True), (1.0, True), (0.0, True), (0.0, True)]
    assert caplog.text.count("majority vote saturated") == 2


# -- likelihood: Sharpening's self-reward ------------------------------------------------------------------------
class LogprobEngine:
    """choice_logprobs from a table: log p of each completion text."""

    def __init__(self, table: dict[str, float]):
        self.table, self.calls = table, []

    def choice_logprobs(self, prompts, choices, weights):
        self.calls.append((len(prompts), list(choices)))
        return [{c: self.table[c] for c in choices} for _ in prompts]


def test_likelihood_per_token_and_sum_differ_as_worked_by_hand():
    engine = LogprobEngine({"short": -2.0, "much longer": -3.0})
    batch = [sample("p", "short", "5", 0, token_ids=[7]), sample("p", "much longer", "5", 1, token_ids=[1, 2, 3]),
             sample("p", "short", "5", 2, num_tokens=1), sample("p", "", "5", 3, num_tokens=0)]
    per_token = build({"name": "likelihood"}, engine).judge(batch)
    assert [v.score for v in per_token[:3]] == [-2.0, -1.0, -2.0]  # -3 over 3 tokens beats -2 over 1
    assert per_token[3].score is None and "empty" in per_token[3].error
    assert engine.calls == [(1, ["short", "much longer"])]  # one call per prompt, each text once
    total = build({"name": "likelihood", "normalise": "sum"}, engine).judge(batch)
    assert [v.score for v in total[:3]] == [-2.0, -3.0, -2.0]  # the total prefers the short one


class PromptLogprobEngine(LogprobEngine):
    """choice_logprobs from a table keyed by (the prompt's last turn, the completion text)."""

    def choice_logprobs(self, prompts, choices, weights):
        self.calls.append((len(prompts), list(choices)))
        return [{c: self.table[p[-1]["content"], c] for c in choices} for p in prompts]


def test_likelihood_scores_each_sample_under_its_own_prompt():
    # the same text is likely after one question and unlikely after the other: log p(y | x) of the sample's own x
    engine = PromptLogprobEngine({("question p", "The answer is 5."): -2.0, ("question q", "The answer is 5."): -8.0,
                                  ("question q", "The answer is 6."): -4.0})
    batch = [sample("p", "The answer is 5.", "", 0, num_tokens=4), sample("q", "The answer is 5.", "", 0, num_tokens=4),
             sample("q", "The answer is 6.", "", 1, num_tokens=2)]
    verdicts = build({"name": "likelihood"}, engine).judge(batch)
    assert [v.score for v in verdicts] == [-0.5, -2.0, -2.0]
    assert engine.calls == [(1, ["The answer is 5."]), (1, ["The answer is 5.", "The answer is 6."])]
    critic = build({"name": "likelihood"}, engine)
    assert critic.stats(batch, verdicts) == {"auroc": None}  # no gold: nothing to rank against


def test_likelihood_auroc_against_gold():
    engine = LogprobEngine({"The answer is 5.": -1.0, "The answer is 6.": -4.0, "The answer is 7.": -2.0})
    batch = [sample("p", t, "5", k, num_tokens=1) for k, t in
             enumerate(["The answer is 5.", "The answer is 6.", "The answer is 7."])]
    critic = build({"name": "likelihood"}, engine)
    assert critic.stats(batch, critic.judge(batch)) == {"auroc": 1.0}  # the one correct answer scores highest
    batch = [{**s, "answer": "7"} for s in batch]  # now the correct one is in the middle: it beats one of two
    assert critic.stats(batch, critic.judge(batch)) == {"auroc": 0.5}


def test_likelihood_ranks_what_the_weights_learned_on_the_hf_engine(tiny_model, tiny_adapter):
    from selfimprove.engines.hf_engine import HFEngine
    from selfimprove.tasks.arithmetic import Arithmetic

    hf = HFEngine(HFEngine.Config(), tiny_model)
    prompt = Arithmetic(Arithmetic.Config(num_train=40, num_test=12)).prompt({"question": "12 + 30"})
    texts = [TARGET, "Purple elephants sing."]  # the adapter was trained to answer TARGET to every sum
    batch = [sample("p", t, "42", k, prompt=prompt, num_tokens=len(hf.tokenizer.encode(t, add_special_tokens=False)))
             for k, t in enumerate(texts)]
    tuned = build({"name": "likelihood"}, hf, Weights(tiny_model, tiny_adapter, "tuned")).judge(batch)
    assert tuned[0].score > tuned[1].score + 1


# -- best-of-N selection -----------------------------------------------------------------------------------------
SCORES = {"p0/0": 0.3, "p0/1": 0.7, "p1/0": 0.5, "p1/1": 0.5, "p2/0": -1.0, "p2/1": -2.0}


def table_scores(samples):
    """Scores from SCORES; p3's samples fail."""
    return [{"score": None, "error": "cannot judge"} if s["problem_id"] == "p3" else SCORES[s["sample_id"]]
            for s in samples]


def test_best_of_keeps_each_problems_highest_score(tmp_path):
    critique_then(tmp_path, samples_of(4), "tests.test_labelfree:table_scores", max_error_rate=1.0)
    out = run_filter(tmp_path, best_of=True)
    kept = load_rows(tmp_path / "filter" / "data")
    # p0: the higher; p1: a tie goes to the first; p2: the less negative; p3: nothing valid to rank
    assert [r["sample_ids"] for r in kept] == [["p0/1"], ["p1/0"], ["p2/0"]]
    assert out["invalid"] == 2
    with pytest.raises(Exception, match="best_of selects by score rank"):
        run_filter(tmp_path, best_of=True, min_score=0.0)


# -- TTRL end to end on the tiny model ---------------------------------------------------------------------------
def test_rl_with_majority_reward_logs_the_vote_and_says_test_time(engine, tmp_path):
    overrides = ["rounds=1", "evaluate_base=false", "stages.rl.steps=2", "stages.rl.critic={name: majority}",
                 "stages.rl.problems={split: test}"]
    Runner(load_pipeline(TINY_GRPO, overrides), tmp_path / "run", engine=engine, log=quiet).run()
    rl = tmp_path / "run" / "round_001" / "rl"
    for step in (1, 2):
        metrics = read_json(rl / "versions" / f"{step:05d}" / "step.json")
        rows = load_rows(rl / "versions" / f"{step:05d}" / "rollouts")
        assert {"majority/label_accuracy", "majority/reward_accuracy", "majority/saturated"} <= set(metrics)
        # a sample's score is its answer's vote share, so a problem's highest score is its winner's share
        best = {}
        for r in rows:
            best[r["problem_id"]] = max(best.get(r["problem_id"], 0.0), r["scores"][0])
        assert metrics["majority/majority_ratio"] == pytest.approx(sum(best.values()) / len(best))
    manifest = read_json(rl / "manifest.json")
    cells = RL.report(manifest["metrics"])
    assert "test-time training on the evaluation problems" in cells["trained on"]
    assert "majority_ratio" in cells["critic signal (mean over steps)"]
