"""B-STaR's adaptive configuration in the generate stage: with an engine whose answers are right only at some
temperatures, the sweep picks the one with the best balance score (repeats of one completion counting once),
samples the round with it, records the sweep, and a resumed sweep does not sample its probes again; a filter can
take the chosen reward threshold. The probes are judged by the real `answer` critic (Adapt's default)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from selfimprove.config import build
from selfimprove.records import Completion, Weights
from selfimprove.shipped import root
from selfimprove.stages.generate import Generate
from selfimprove.tasks.arithmetic import Arithmetic

TASK = Arithmetic(Arithmetic.Config(num_train=40, num_test=4))


class TemperatureEngine:
    """Per temperature, how many of a prompt's samples are right, and whether they are all one repeated text.

    The default: at 0.7 every sample is right and each is worded differently, at 1.0 one sample per prompt is
    right, at 0.5 none is."""

    def __init__(self, right=None, repeated=()):
        self.right = right or {0.7: None, 1.0: 1}  # None: every sample
        self.repeated = set(repeated)
        self.calls: list[float] = []

    def generate(self, prompts, sampling, weights, seed):
        t = sampling.temperature
        self.calls.append(t)
        right = self.right.get(t, 0)
        right = sampling.n if right is None else right
        out = []
        for prompt in prompts:
            a, b = map(int, re.search(r"(\d+) \+ (\d+)", prompt[-1]["content"]).groups())
            out.append([Completion(f"{'' if t in self.repeated else f'Attempt {k}: '}{a} + {b} makes "
                                   f"{a + b}. The answer is {a + b}." if k < right else "The answer is -1.", "stop", 6)
                        for k in range(sampling.n)])
        return out


class Context:
    def __init__(self, root: Path, engine):
        self.round, self.stage, self.task, self.base_model = 1, "generate", TASK, "model"
        self.out_dir = root / "generate"
        self._engine = engine

    def seed(self, *parts):
        return len(str(parts))

    def engine(self):
        return self._engine

    def weights(self, which):
        return Weights("model")

    def input_dir(self, stage):
        raise AssertionError("no inputs")


def run(tmp_path, engine, adapt, n=4):
    config = build(Generate.Config, {"problems": {"num_problems": 12}, "sampling": {"n": n, "temperature": 1.0},
                                     "adapt": adapt}, "test")
    return Generate(config, Context(tmp_path, engine)).run()


def sweep_json(tmp_path) -> dict:
    return json.loads((tmp_path / "generate" / "sweep.json").read_text())


def test_sweep_picks_the_temperature_with_the_best_balance_and_samples_with_it(tmp_path):
    engine = TemperatureEngine()
    adapt = {"temperatures": [0.5, 1.0, 0.7], "thresholds": [None, 0.5], "probe_problems": 5}
    metrics = run(tmp_path, engine, adapt)
    # per probe query, n* = 8: 0.7 keeps 4 distinct right samples, 4/8 · 4/4 = 0.5; 1.0 keeps 1, 1/8 · 1/1;
    # 0.5 keeps nothing, 0 for every query
    assert metrics["adapt/temperature"] == 0.7 and metrics["adapt/threshold"] is None
    assert metrics["adapt/balance"] == pytest.approx(0.5)
    sweep = sweep_json(tmp_path)
    by = {(r["temperature"], r["threshold"]): r["balance"] for r in sweep["results"]}
    assert by == {(0.5, None): 0.0, (0.5, 0.5): 0.0, (1.0, None): pytest.approx(0.125),
                  (1.0, 0.5): pytest.approx(0.125), (0.7, None): pytest.approx(0.5), (0.7, 0.5): pytest.approx(0.5)}
    assert sweep["chosen"] == {"temperature": 0.7, "threshold": None} and sweep["probe_problems"] == 5
    assert engine.calls == [0.5, 1.0, 0.7, 0.7]  # three probes, then the round itself at the chosen temperature
    assert metrics["samples"] == 48
    assert Generate.report(metrics) == {"B-STaR choice": "T=0.7 (balance 0.500)"}

    # resumed (the round's sampling interrupted): the probes are read back, not sampled again
    (tmp_path / "generate" / "data").rename(tmp_path / "old-data")
    for shard in (tmp_path / "generate" / "shards").iterdir():
        shard.rename(tmp_path / f"old-{shard.name}")
    engine.calls.clear()
    assert run(tmp_path, engine, adapt)["adapt/temperature"] == 0.7 and engine.calls == [0.7]


def test_repeats_of_one_right_completion_count_once(tmp_path):
    """A model collapsed at low temperature: at 0.3 all 8 samples of a prompt are one right completion repeated; at
    1.0 three are right and worded differently. Counting repeats, 0.3 would score min(8/8, 1) · 8/8 = 1 per query
    against 1.0's min(3/8, 1) · 3/3 = 0.375 and win; counted once, 0.3 has n' = n = 1: 1/8 · 1/1 = 0.125."""
    engine = TemperatureEngine(right={0.3: None, 1.0: 3}, repeated={0.3})
    metrics = run(tmp_path, engine, {"temperatures": [0.3, 1.0], "probe_problems": 3}, n=8)
    sweep = sweep_json(tmp_path)
    assert [(r["temperature"], r["kept"]) for r in sweep["results"]] == [(0.3, 24), (1.0, 9)]  # 8 and 3 per query
    assert [r["balance"] for r in sweep["results"]] == [pytest.approx(0.125), pytest.approx(0.375)]
    assert metrics["adapt/temperature"] == 1.0 and engine.calls == [0.3, 1.0, 1.0]


def test_a_sweep_that_keeps_nothing_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="no candidate setting kept a correct sample"):
        run(tmp_path, TemperatureEngine(), {"temperatures": [0.5, 0.3], "probe_problems": 3})


def test_filter_takes_the_threshold_the_sweep_chose(tmp_path):
    from selfimprove.pipeline import load_pipeline
    from selfimprove.stages.common import selected

    base = root() / "pipelines" / "star_arithmetic.yaml"
    pipeline = load_pipeline(base, ["stages.generate.adapt={temperatures: [0.5, 0.7], thresholds: [0.3, 0.6]}",
                                    "stages.filter.min_score_from=generate"])
    assert pipeline.config.stages["filter"].config.min_score_from == "generate"
    from selfimprove.config import ConfigError

    with pytest.raises(ConfigError, match="min_score_from: stage 'rationalize' does not adapt"):
        load_pipeline(base, ["stages.filter.min_score_from=rationalize"])
    assert selected({"score": 0.7, "label": False}, 0.6) and not selected({"score": 0.5, "label": True}, 0.6)
    assert selected({"score": 0.1, "label": True}, None) and not selected(None, None)
