"""benchmarks/grpo_vs_trl.py end to end at the tiniest size: both sides run on the tiny random model and report
per-step times that add up (~1.5 minutes on 2 CPU cores)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_grpo_vs_trl_reports_both_sides(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "grpo_vs_trl.py"), "--model", "tiny-random-llama", "--steps", "1",
         "--prompts", "2", "--group", "2", "--max-tokens", "4", "--out-dir", str(tmp_path),
         "--keep-all-groups", "--set", "engine.in_process=true"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| seconds per step" in out.stdout and "P10:" in out.stdout and "P9:" in out.stdout
    r = json.loads((tmp_path / "grpo_vs_trl.json").read_text())
    ours, trl = r["selfimprove"]["steps"], r["trl"]["steps"]
    assert len(ours) == len(trl) == 1
    assert ours[0]["trained_samples"] == trl[0]["trained_samples"] == 4  # every group updated on, on both sides
    # The pipeline's parts fit inside its recorded step, and the step inside its wall time (which adds the commit);
    # the stage rounds each of its numbers to 0.01 s.
    assert 0 < ours[0]["generate_seconds"] + ours[0]["update_seconds"] <= ours[0]["step_seconds"] + 0.02
    assert ours[0]["step_seconds"] <= ours[0]["wall_seconds"] + 0.01
    assert 0 < trl[0]["generate_seconds"] < trl[0]["step_seconds"]
    assert r["trl"]["settings"]["num_generations"] == 2 and r["trl"]["settings"]["max_completion_length"] == 4
    assert r["P10_trl_over_selfimprove"] > 0 and 0 <= r["P9_outside_share_median"] <= 1
    assert r["selfimprove"]["peak_rss_mib"] > 0 and r["trl"]["peak_rss_mib"] > 0
