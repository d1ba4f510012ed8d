"""Invalid verdicts (raised, timed out, unparseable, off-scale) are left out, never read as 0, and are counted;
a critic that gives scores without labels is said so, not silently kept-nothing."""

from __future__ import annotations

import logging

import pytest

from selfimprove.artifacts import load_rows
from selfimprove.config import build
from selfimprove.report_html import _critics
from selfimprove.stages.common import unsolved_problem_ids
from selfimprove.stages.critique import Critique
from selfimprove.stages.filter import Filter
from selfimprove.stages.rl import _mean, _valid_groups
from selfimprove.trainers.rl import Rollout
from tests.test_critics import GSM, FakeContext, run_critique, sample


def scores_only(samples):
    """A plugin critic returning bare floats: scores, no labels."""
    return [0.9 if s["problem_id"] in ("p0", "p1") else 0.2 for s in samples]


def samples_of(n: int = 4) -> list[dict]:
    return [sample(f"p{i}", f"Attempt {k}: the answer is {i}.", str(i), k) for i in range(n) for k in range(2)]


class FilterContext(FakeContext):
    """The filter over the generate and critique stages `critique_then` wrote under tmp_path."""

    def __init__(self, tmp_path):
        self.round, self.stage, self.task, self.base_model = 1, "filter", GSM, "model"
        self.out_dir, self._root = tmp_path / "filter", tmp_path


def run_filter(tmp_path, **config) -> dict:
    return Filter(build(Filter.Config, config, "test"), FilterContext(tmp_path)).run()


def critique_then(tmp_path, samples, critic: str, **calls) -> dict:
    metrics, _ = run_critique(tmp_path, samples, critics=[{"name": critic}], quality=False, **calls)
    return metrics


def test_a_critic_with_scores_only_is_warned_about_and_the_filter_needs_min_score(tmp_path, caplog):
    critic = "tests.test_verdicts:scores_only"
    with caplog.at_level(logging.WARNING, logger="selfimprove.stages.critique"):
        metrics = critique_then(tmp_path, samples_of(), critic)
    assert metrics[f"{critic}/unlabelled"] == 8 and metrics[f"{critic}/positive"] == 0
    assert "gives scores without labels" in caplog.text and "min_score" in caplog.text
    # selecting by label would keep nothing: the filter says so instead of training on nothing
    with pytest.raises(ValueError, match=r"filter 'filter': critic .*scores_only' in stage 'critique' gives scores "
                                         r"without labels.*set `min_score:`"):
        run_filter(tmp_path)
    # with a threshold it keeps exactly the samples scored at least that, and its report cell says which
    out = run_filter(tmp_path, min_score=0.5)
    kept = load_rows(tmp_path / "filter" / "data")
    assert out["examples"] == 4 and {r["problem_id"] for r in kept} == {"p0", "p1"}
    assert Filter.report(out)["min score"] == "0.5"


def half_broken(samples):
    """Labels p0 correct, p1 incorrect; raises on p2 (every sample of it invalid)."""
    if any(s["problem_id"] == "p2" for s in samples):
        raise ValueError("cannot judge p2")
    return [s["problem_id"] == "p0" for s in samples]


def test_invalid_verdicts_are_counted_and_left_out_not_scored_zero(tmp_path):
    critic = "tests.test_verdicts:half_broken"
    metrics = critique_then(tmp_path, samples_of(3), critic, max_error_rate=1.0)
    assert metrics[f"{critic}/invalid"] == 2 and metrics["invalid"] == 2 and metrics[f"{critic}/positive"] == 2
    assert Critique.report(metrics) == {f"{critic} positive / invalid": "2 / 2"}
    out = run_filter(tmp_path, min_score=0.0)  # a threshold of 0: a failure read as score 0 would pass it
    assert out["invalid"] == 2 and out["examples"] == 4
    assert {r["problem_id"] for r in load_rows(tmp_path / "filter" / "data")} == {"p0", "p1"}
    assert Filter.report(out)["invalid"] == "2"
    # rationalization: p1 is unsolved; p2, whose verdicts are all invalid, is unknown, not unsolved
    verdicts = load_rows(tmp_path / "critique" / "data")
    assert unsolved_problem_ids(verdicts, None, "critique") == {"p1"}


def test_unsolved_in_refuses_a_critic_without_labels(tmp_path):
    critique_then(tmp_path, samples_of(2), "tests.test_verdicts:scores_only")
    with pytest.raises(ValueError, match="gives scores without labels.*`unsolved_in` needs a critic that labels"):
        unsolved_problem_ids(load_rows(tmp_path / "critique" / "data"), None, "critique")


def test_rl_groups_keep_their_valid_members_and_lone_members_contribute_nothing():
    def rollout(group: str, reward: float) -> Rollout:
        return Rollout(group=group, prompts=[[]], completions=["x"], eos=[True], rewards=[reward], version="v")

    # group a kept 3 valid members, b kept 1 (its others' verdicts were invalid and were dropped before)
    kept = _valid_groups([rollout("a", 1.0), rollout("a", 0.0), rollout("b", 1.0), rollout("a", 0.5)])
    assert [(r.group, r.rewards) for r in kept] == [("a", [1.0]), ("a", [0.0]), ("a", [0.5])]
    assert _valid_groups([rollout("b", 1.0)]) == []
    assert _mean([1.0, None, 0.0]) == 0.5 and _mean([None]) is None  # invalid scores are not zeros


def test_html_critic_table_shows_invalid_and_timeouts():
    rounds = {1: [{"stage": "critique", "metrics": {"judge/positive": 3, "judge/invalid": 5, "judge/timeouts": 2}}],
              2: [{"stage": "critique", "metrics": {"judge/positive": 4, "judge/errors": 1, "judge/timeouts": 0}}]}
    page = _critics(rounds)
    assert "<th>invalid (timeouts)</th>" in page
    assert "<td>judge</td><td>-</td><td>5 (2)</td>" in page  # no gold: no quality, the counts still shown
    assert "<td>judge</td><td>-</td><td>1 (0)</td>" in page  # a run written before `invalid` was named


def test_rl_report_shows_a_step_with_no_valid_reward_as_a_dash():
    from selfimprove.stages.rl import RL

    cells = RL.report({"steps": 2, "reward/attempt1/first": None, "reward/attempt1/last": 0.5,
                       "reward/attempt1/mean": 0.5, "invalid_rewards": 3})
    assert cells["RL reward"] == "reward/attempt1: -→0.500 (mean 0.500)"
    assert cells["invalid rewards"] == "3"
