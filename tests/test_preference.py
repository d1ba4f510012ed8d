"""Preference pairs (rules on hand-made verdicts), and DPO / SPIN rounds on the tiny model."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from selfimprove.artifacts import load_rows, read_json, save_rows
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.shipped import root
from selfimprove.stages.common import ProblemSelection
from selfimprove.stages.gold import GoldData
from selfimprove.stages.pairs import Pairs, SpinPairs, build_pairs
from selfimprove.tasks.arithmetic import Arithmetic

REPO = Path(__file__).resolve().parents[1]


def v(score, label=None):
    return {"score": score, "label": label}


def s(i):
    return {"sample_id": f"s{i}", "index": i}


def test_correct_incorrect_pairs_best_correct_with_worst_incorrect():
    judged = [(s(0), v(0.0, False)), (s(1), v(1.0, True)), (s(2), v(0.2, False)), (s(3), v(0.9, True))]
    pairs = build_pairs(judged, "correct_incorrect", 0.0, cap=5)
    assert [(a["sample_id"], b["sample_id"]) for (a, _), (b, _) in pairs] == [("s1", "s0"), ("s3", "s2")]
    assert len(build_pairs(judged, "correct_incorrect", 0.0, cap=1)) == 1
    assert build_pairs([(s(0), v(1.0, True)), (s(1), v(1.0, True))], "correct_incorrect", 0.0, 3) == []


def test_best_worst_respects_margin_and_never_pairs_ties():
    judged = [(s(0), v(0.5)), (s(1), v(0.9)), (s(2), v(0.1)), (s(3), v(0.6))]
    pairs = build_pairs(judged, "best_worst", 0.0, cap=5)
    assert [(a["sample_id"], b["sample_id"]) for (a, _), (b, _) in pairs] == [("s1", "s2"), ("s3", "s0")]
    assert len(build_pairs(judged, "best_worst", 0.5, cap=5)) == 1  # 0.6 - 0.5 < 0.5 stops the second pair
    assert build_pairs([(s(0), v(0.5)), (s(1), v(0.5))], "best_worst", 0.0, 5) == []


def _ctx(tmp_path, task, samples, verdicts):
    for name, rows in (("generate", samples), ("critique", verdicts)):
        save_rows(rows, tmp_path / name / "data")
    out = tmp_path / "pairs"
    out.mkdir()
    return SimpleNamespace(input_dir=lambda n: tmp_path / n, task=task, out_dir=out, round=1, stage="pairs")


def test_pairs_stage_dedupes_and_keeps_lineage(tmp_path):
    task = Arithmetic(Arithmetic.Config(num_train=20, num_test=3))
    p = task.problems("train")[0]
    texts = ["The answer is 1.", "The answer is 1.", p["solution"], " "]
    samples = [{**p, "sample_id": f"x/{k}", "index": k, "completion": t, "hint": False} for k, t in enumerate(texts)]
    verdicts = [{"sample_id": f"x/{k}", "problem_id": p["problem_id"], "critic": "answer", "score": float(ok),
                 "label": ok, "rationale": None, "error": None} for k, ok in enumerate([False, False, True, False])]
    ctx = _ctx(tmp_path, task, samples, verdicts)
    metrics = Pairs(Pairs.Config(max_pairs_per_problem=3), ctx).run()
    rows = load_rows(ctx.out_dir / "data")
    # the duplicate incorrect text and the empty completion never form pairs: one pair is all there is
    assert metrics["pairs"] == 1 and metrics["duplicate"] == 1 and metrics["unjudged_or_empty"] == 1
    (row,) = rows
    assert (row["chosen_sample_id"], row["rejected_sample_id"]) == ("x/2", "x/0")
    assert row["chosen"][0]["content"] == p["solution"] and row["prompt"] == task.prompt(p)


def test_spin_pairs_use_gold_as_chosen(tmp_path):
    task = Arithmetic(Arithmetic.Config(num_train=20, num_test=3))
    probs = task.problems("train")[:2]
    samples = [{**probs[0], "sample_id": "a", "index": 0, "completion": "The answer is 0."},
               {**probs[1], "sample_id": "b", "index": 0, "completion": probs[1]["solution"]}]
    ctx = _ctx(tmp_path, task, samples, [])
    metrics = SpinPairs(SpinPairs.Config(), ctx).run()
    rows = load_rows(ctx.out_dir / "data")
    assert metrics == {"pairs": 1, "identical_to_gold": 1, "without_gold": 0}
    assert rows[0]["chosen"][0]["content"] == probs[0]["solution"] and rows[0]["rejected_sample_id"] == "a"


def quiet(*_):
    pass


def test_spin_iteration_trains_against_the_previous_iteration(engine, tmp_path):
    run = tmp_path / "spin"
    Runner(load_pipeline(root() / "pipelines" / "tiny_spin.yaml"), run, engine=engine, log=quiet).run()
    w1 = read_json(run / "round_001" / "train" / "weights.json")
    w2 = read_json(run / "round_002" / "train" / "weights.json")
    m2 = read_json(run / "round_002" / "train" / "manifest.json")["metrics"]
    # the opponent of iteration 2 is iteration 1: it generated the rejected responses...
    assert {(r["weights"]["label"], r["weights"]["adapter_hash"]) for r in
            load_rows(run / "round_002" / "generate" / "data")} == {("round_001/train", w1["adapter_hash"])}
    # ...it is where the policy starts and it is the reference
    assert w2["init"]["adapter"] == w1["adapter"] == w2["policy"]["adapter"]
    assert m2["reference"] == f"policy {w1['adapter']} (frozen adapter copy)"
    # policy == reference before the first update, so the first DPO loss is exactly log 2
    assert m2["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert w2["adapter_hash"] != w1["adapter_hash"]  # training changed the adapter
    ev = read_json(run / "round_002" / "evaluate" / "manifest.json")["metrics"]
    assert ev["weights"] == "round_002/train" and ev["problems"] == 6  # and the engine served it


def test_self_rewarding_quick_start_pairs_the_policys_best_and_worst_judged_samples(engine, tmp_path):
    """The shipped quick start (nothing outside the package): pairs are ranked by the policy's own judgement."""
    run = tmp_path / "self_rewarding"
    Runner(load_pipeline(root() / "pipelines" / "tiny_self_rewarding.yaml"), run, engine=engine, log=quiet).run()
    verdicts = load_rows(run / "round_001" / "critique" / "data")
    assert {v["critic"] for v in verdicts} == {"self_verify", "answer"}
    judged = {v["sample_id"]: v["score"] for v in verdicts if v["critic"] == "self_verify"}
    by_problem = {}
    for sample_id, score in judged.items():
        by_problem.setdefault(sample_id.rsplit("/", 1)[0], []).append(score)
    pairs = load_rows(run / "round_001" / "pairs" / "data")
    assert len(pairs) == 8  # one per problem: three samples each, judged with different P(Yes)
    for p in pairs:
        scores = by_problem[p["chosen_sample_id"].rsplit("/", 1)[0]]
        assert (judged[p["chosen_sample_id"]], judged[p["rejected_sample_id"]]) == (max(scores), min(scores))
    w1 = read_json(run / "round_001" / "train" / "weights.json")
    w2 = read_json(run / "round_002" / "train" / "weights.json")
    assert w2["init"]["adapter"] == w1["adapter"] and w1["adapter_hash"] != w2["adapter_hash"]
    assert read_json(run / "round_002" / "evaluate" / "manifest.json")["metrics"]["weights"] == "round_002/train"


def test_dpo_reference_choice_is_real(tiny_model, tiny_adapter, tmp_path):
    """Starting from a strongly trained adapter, reference=policy gives loss log 2 at step one, reference=base
    does not: the reference model is what the config says."""
    from selfimprove.trainers.common import LoraSettings, Optimization
    from selfimprove.trainers.dpo import DPO

    task = Arithmetic(Arithmetic.Config(num_train=8, num_test=3, prompt_format="chat"))
    rows = [{"prompt": task.prompt(p), "chosen": [{"role": "assistant", "content": p["solution"]}],
             "rejected": [{"role": "assistant", "content": "The answer is 42."}]} for p in task.problems("train")]
    losses = {}
    for reference in ("policy", "base"):
        cfg = DPO.Config(lora=LoraSettings(r=8, alpha=16, dropout=0.0),
                         optim=Optimization(max_steps=1, batch_size=4, logging_steps=1, learning_rate=1e-4),
                         reference=reference)
        m = DPO(cfg).train(rows, tiny_model, tiny_adapter, tmp_path / reference / "adapter", tmp_path / reference / "w",
                           seed=0, round_index=2, policy_adapter=tiny_adapter)
        losses[reference] = m["first_loss"]
    assert losses["policy"] == pytest.approx(math.log(2), abs=1e-4)
    # against the base, the strongly tuned policy already has a reward margin, so the loss is far from log 2
    assert abs(losses["base"] - math.log(2)) > 0.05


def test_iterative_dpo_round_changes_and_serves_the_adapter(engine, tmp_path):
    run = tmp_path / "dpo"
    Runner(load_pipeline(REPO / "tests" / "pipelines" / "tiny_dpo.yaml"), run, engine=engine, log=quiet).run()
    pairs = load_rows(run / "round_001" / "pairs" / "data")
    assert pairs and all(p["chosen_score"] - p["rejected_score"] >= 1.0 for p in pairs)
    assert all(len(p["chosen"][0]["content"]) > len(p["rejected"][0]["content"]) for p in pairs)
    w1 = read_json(run / "round_001" / "train" / "weights.json")
    w2 = read_json(run / "round_002" / "train" / "weights.json")
    assert w1["trained"] and w2["trained"] and w1["adapter_hash"] != w2["adapter_hash"]
    assert w2["init"]["adapter"] == w1["adapter"]  # iterative: round 2 continues round 1's policy
    from safetensors.torch import load_file

    tensors = load_file(Path(w1["adapter"]) / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tensors.items())  # B starts at zero: it moved
    assert read_json(run / "round_002" / "evaluate" / "manifest.json")["metrics"]["weights"] == "round_002/train"


def test_gold_data_rows_are_the_tasks_worked_solutions(tmp_path):
    task = Arithmetic(Arithmetic.Config(num_train=20, num_test=3))
    out = tmp_path / "gold_data"
    out.mkdir()
    ctx = SimpleNamespace(task=task, out_dir=out, round=1, stage="gold_data", seed=lambda *_: 0)
    config = GoldData.Config(problems=ProblemSelection(num_problems=3, shuffle=False))
    assert GoldData(config, ctx).run() == {"examples": 3, "without_gold": 0}
    first = task.problems("train")[:3]
    rows = load_rows(out / "data")
    assert [r["problem_id"] for r in rows] == [p["problem_id"] for p in first]
    # e.g. "17 + 25": the scratchpad worked column by column, ending in "The answer is 42."
    assert [r["completion"] for r in rows] == [[{"role": "assistant", "content": p["solution"]}] for p in first]
    assert rows[0]["completion"][0]["content"].endswith(f"The answer is {first[0]['answer']}.")
    assert rows[0]["prompt"] == task.prompt(first[0]) and rows[0]["source"] == "gold"


def test_gold_data_refuses_a_task_without_worked_solutions(tmp_path):
    task = SimpleNamespace(problems=lambda split: [{"problem_id": "p"}], reference_solution=lambda p: None,
                           prompt=lambda p: "q")
    ctx = SimpleNamespace(task=task, out_dir=tmp_path, round=1, stage="gold_data", seed=lambda *_: 0)
    with pytest.raises(ValueError, match="has no reference solutions"):
        GoldData(GoldData.Config(), ctx).run()


def test_spin_starts_from_the_model_fine_tuned_on_gold(engine, tmp_path):
    """SPIN as the paper runs it: SFT on the gold data first, then SPIN iterations from that adapter."""
    sft = tmp_path / "sft.yaml"
    sft.write_text("include: sft_gold_arithmetic\nmodel: tiny-random-llama\nevaluate_base: false\n"
                   "engine: {in_process: true, max_model_len: 1024}\ntask: {num_train: 100, num_test: 12}\n"
                   "stages:\n  gold_data: {problems: {num_problems: 8}}\n"
                   "  train: {trainer: {lora: {r: 4, alpha: 8}, optim: {max_steps: 2, max_length: 512}}}\n"
                   "  evaluate: {problems: {num_problems: 4}, sampling: {max_tokens: 8}}\n")
    Runner(load_pipeline(sft), tmp_path / "sft", engine=engine, log=quiet).run()
    adapter = tmp_path / "sft" / "round_001" / "train" / "adapter"
    gold = load_rows(tmp_path / "sft" / "round_001" / "gold_data" / "data")
    assert len(gold) == 8 and all(r["source"] == "gold" for r in gold)
    spin = tmp_path / "spin"
    Runner(load_pipeline(root() / "pipelines" / "tiny_spin.yaml", [f"adapter={adapter}", "rounds=1"]), spin,
           engine=engine, log=quiet).run()
    w1 = read_json(spin / "round_001" / "train" / "weights.json")
    assert w1["init"]["adapter"] == str(adapter.resolve())  # the SFT model is where SPIN starts...
    # ...and the opponent whose answers are rejected, from round 0's evaluation on
    assert read_json(spin / "round_000" / "evaluate" / "manifest.json")["metrics"]["weights"] == "initial adapter"
    assert {r["weights"]["adapter_hash"] for r in load_rows(spin / "round_001" / "generate" / "data")} == {
        read_json(tmp_path / "sft" / "round_001" / "train" / "weights.json")["adapter_hash"]}
