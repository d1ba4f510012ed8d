"""Real-model end-to-end checks (minutes each): `pytest -m slow`. CI runs the tiny-model pipelines instead."""

import pytest

from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.shipped import root


@pytest.mark.slow
def test_one_star_round_lifts_arithmetic_accuracy(tmp_path):
    """If one STaR round does not lift held-out accuracy on the arithmetic testbed, the implementation is wrong.
    (The main job went from 13.3% to 52.0% after its first round.)"""
    pipe = load_pipeline(root() / "pipelines" / "star_arithmetic.yaml", ["rounds=1", "name=slow-star"])
    results = Runner(pipe, tmp_path / "run", log=lambda *_: None).run()
    base, after = results[0], results[1]
    assert after["accuracy"] > base["accuracy_ci_high"], (base, after)
