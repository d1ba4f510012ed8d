"""B-STaR's adaptive configuration in the generate stage: with an engine whose answers are right only at one
temperature, the sweep picks that temperature, samples the round with it, records the sweep, and a resumed sweep
does not sample its probes again; a filter can take the chosen reward threshold."""

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
    """Right on every sample at 0.7, on one sample per prompt at 1.0, never at 0.5."""

    def __init__(self):
        self.calls: list[float] = []

    def generate(self, prompts, sampling, weights, seed):
        self.calls.append(sampling.temperature)
        out = []
        for prompt in prompts:
            a, b = map(int, re.search(r"(\d+) \+ (\d+)", prompt[-1]["content"]).groups())
            right = {0.7: sampling.n, 1.0: 1}.get(sampling.temperature, 0)
            out.append([Completion(f"The answer is {a + b if k < right else -1}.", "stop", 6)
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


def run(tmp_path, engine, adapt):
    config = build(Generate.Config, {"problems": {"num_problems": 12}, "sampling": {"n": 4, "temperature": 1.0},
                                     "adapt": adapt}, "test")
    return Generate(config, Context(tmp_path, engine)).run()


def test_sweep_picks_the_temperature_with_the_best_balance_and_samples_with_it(tmp_path):
    engine = TemperatureEngine()
    adapt = {"temperatures": [0.5, 1.0, 0.7], "thresholds": [None, 0.5], "probe_problems": 5}
    metrics = run(tmp_path, engine, adapt)
    # balance per query: min(n'/8, 1) · n'/n over kept samples — 0.7: 4/8 · 1; 1.0: 1/8 · 1; 0.5: nothing kept
    assert metrics["adapt/temperature"] == 0.7 and metrics["adapt/threshold"] is None
    assert metrics["adapt/balance"] == pytest.approx(0.5)
    sweep = json.loads((tmp_path / "generate" / "sweep.json").read_text())
    by = {(r["temperature"], r["threshold"]): r["balance"] for r in sweep["results"]}
    assert by == {(0.5, None): None, (0.5, 0.5): None, (1.0, None): pytest.approx(0.125),
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


def test_a_sweep_that_keeps_nothing_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="no candidate setting kept a sample"):
        run(tmp_path, TemperatureEngine(), {"temperatures": [0.5, 0.3], "probe_problems": 3})


def test_filter_takes_the_threshold_the_sweep_chose(tmp_path):
    from selfimprove.pipeline import load_pipeline
    from selfimprove.stages.filter import _selected

    base = root() / "pipelines" / "star_arithmetic.yaml"
    pipeline = load_pipeline(base, ["stages.generate.adapt={temperatures: [0.5, 0.7], thresholds: [0.3, 0.6]}",
                                    "stages.filter.min_score_from=generate"])
    assert pipeline.config.stages["filter"].config.min_score_from == "generate"
    from selfimprove.config import ConfigError

    with pytest.raises(ConfigError, match="min_score_from: stage 'rationalize' does not adapt"):
        load_pipeline(base, ["stages.filter.min_score_from=rationalize"])
    assert _selected({"score": 0.7, "label": False}, 0.6) and not _selected({"score": 0.5, "label": True}, 0.6)
    assert _selected({"score": 0.1, "label": True}, None) and not _selected(None, None)
