"""benchmarks/training_precision.py: its two sides really differ in precision and only there, they take turns step
by step, and end to end on the tiny model each part reports what the first step must show."""

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import training_precision  # noqa: E402


def test_the_copies_hold_the_same_weights_in_two_dtypes(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    folders = training_precision.write_copies(tiny_model, tmp_path)
    bf16, fp32 = (AutoModelForCausalLM.from_pretrained(folders[side], dtype="auto") for side in ("bf16", "float32"))
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    weights = dict(fp32.named_parameters())
    assert all(torch.equal(p.float(), weights[name]) for name, p in bf16.named_parameters())
    # the tiny model is float32: the copies are its bf16 rounding, not the original
    original = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    assert not torch.equal(weights["model.embed_tokens.weight"], original["model.embed_tokens.weight"])


def test_dpo_trains_in_float32_on_a_cpu_whatever_the_folder(tiny_model, tmp_path):
    """A bf16 and a float32 folder with the same weights give DPO the same adapter, to the bit: it trains both in
    float32 (each in its folder's dtype, the tiny model's losses already differ after 2 steps). SFT keeps the
    folder's dtype."""
    import torch
    from safetensors.torch import load_file

    from selfimprove.trainers.common import LoraSettings, Optimization, load_policy
    from selfimprove.trainers.dpo import DPO

    folders = training_precision.write_copies(tiny_model, tmp_path)
    assert {p.dtype for p in load_policy(folders["bf16"], None, LoraSettings())[0].parameters()} == {torch.bfloat16}
    rows = training_precision.arithmetic_rows("dpo", "train", 8)
    runs = {}
    for side, folder in folders.items():
        torch.manual_seed(0)  # the fresh adapter's A matrices
        trainer = DPO(DPO.Config(optim=Optimization(learning_rate=5e-5, max_steps=2, logging_steps=1)))
        runs[side] = trainer.train(rows, folder, None, tmp_path / side / "adapter", tmp_path / side / "work", seed=0,
                                   round_index=1)
    assert runs["bf16"]["final_loss"] == runs["float32"]["final_loss"] != runs["bf16"]["first_loss"]
    bf16, fp32 = (load_file(tmp_path / side / "adapter" / "adapter_model.safetensors") for side in folders)
    assert bf16.keys() == fp32.keys() and all(torch.equal(bf16[k], fp32[k]) for k in bf16)


def test_lockstep_alternates_after_a_shared_warm_up():
    go, both, order = [threading.Semaphore(0), threading.Semaphore(0)], threading.Barrier(2), []
    lock = threading.Lock()
    clocks = {me: training_precision.Lockstep(me, go, both, steps=4) for me in (0, 1)}

    def side(me):
        for k in range(1, 5):
            with lock:
                order.append((me, k))
            clocks[me].after_step(k)

    threads = [threading.Thread(target=side, args=(me,)) for me in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(order[:2]) == [(0, 1), (1, 1)]  # the warm-up steps, in either order
    assert order[2:] == [(0, 2), (1, 2), (0, 3), (1, 3), (0, 4), (1, 4)]
    assert all(len(clock.seconds) == 3 for clock in clocks.values())  # steps 2..4 timed


@pytest.mark.slow
def test_both_sides_of_every_part_on_the_tiny_model(tmp_path):
    out = tmp_path / "precision.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "training_precision.py"), "--model", "tiny-random-llama",
         "--sft-steps", "2", "--dpo-steps", "2", "--rl-steps", "2", "--rl-groups", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    for part in ("sft", "dpo", "rl"):
        for side in ("bf16", "float32"):
            s = r[part]["sides"][side]
            assert len(s["steps"]) == 2 and len(s["seconds_per_step"]) == 1 and s["seconds_per_step"][0] > 0
            assert s["peak_rss_mib"] > 0
        assert r[part]["float32_over_bf16"] > 0
    rl = r["rl"]["sides"]
    assert rl["bf16"]["dtypes"] == {"base": ["torch.bfloat16"], "lora": ["torch.float32"]}
    assert rl["float32"]["dtypes"] == {"base": ["torch.float32"], "lora": ["torch.float32"]}
    for side in ("bf16", "float32"):
        # Step 1 starts from B = 0: the policy is its reference, in either precision.
        assert rl[side]["steps"][0]["kl/attempt1"] == 0
        first = r["dpo"]["sides"][side]["steps"][0]
        assert first["rewards/margins"] == 0 and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    held_out = r["sft"]["quality"]["held_out_nll_per_token"]
    assert set(held_out) == {"on bf16 base", "on float32 base"}
    assert all(set(v) == {"base", "bf16-trained", "float32-trained"} for v in held_out.values())
    assert -1 <= r["sft"]["update_agreement"]["cosine"] <= 1
