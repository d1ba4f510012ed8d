"""SCoRe: the five self-correction metrics against a hand-made transition table, and the tiny pipeline end to end
(round 0 baseline, stage I, stage II, evaluation) on the shared engine, with resume. (The objectives' rewards and
KL weights: test_baselines.py.)"""

import shutil
from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, read_json
from selfimprove.records import Weights, adapter_hash
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.selfcorrection import INSTRUCTION, second_prompt, self_correction_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_SCORE = REPO / "tests" / "pipelines" / "tiny_score.yaml"
STAGES = ["stage1", "stage2", "evaluate"]
PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def quiet(*_):
    pass


def test_self_correction_metrics_from_a_transition_table():
    # 10 problems: 3 correct→correct, 2 incorrect→correct, 1 correct→incorrect, 4 incorrect→incorrect
    table = [(True, True)] * 3 + [(False, True)] * 2 + [(True, False)] + [(False, False)] * 4
    m = self_correction_metrics(table, seed=0, resamples=200)
    assert m["problems"] == 10
    assert m["accuracy@t1"] == pytest.approx(0.4)
    assert m["accuracy@t2"] == pytest.approx(0.5)
    assert m["delta_t1_t2"] == pytest.approx(0.1)
    assert m["delta_i_to_c"] == pytest.approx(0.2)
    assert m["delta_c_to_i"] == pytest.approx(0.1)
    for name in ("accuracy@t1", "accuracy@t2", "delta_t1_t2", "delta_i_to_c", "delta_c_to_i"):
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"]
    assert m["accuracy@t1_ci_low"] < m["accuracy@t1_ci_high"]
    # several samples of a problem are averaged first: intervals resample problems
    m = self_correction_metrics([(False, True), (True, True), (False, False)], seed=0, resamples=200,
                                groups=["a", "a", "b"])
    assert m["problems"] == 2 and m["accuracy@t1"] == pytest.approx(0.25) and m["delta_i_to_c"] == pytest.approx(0.25)


def test_second_prompt_keeps_the_conversation():
    follow = second_prompt(PROMPT, "It is 6.")
    assert follow[:1] == PROMPT and follow[1] == {"role": "assistant", "content": "It is 6."}
    assert follow[2] == {"role": "user", "content": INSTRUCTION}
    assert "There might be an error in the solution above" in INSTRUCTION  # the paper's wording
    assert second_prompt("Q: 2+3?\nA:", " 6", "Check.") == "Q: 2+3?\nA: 6\n\nCheck.\n\n"


@pytest.fixture(scope="module")
def score_run(engine, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("score") / "run"
    llm, loads = engine.llm, engine.weight_loads
    results = Runner(load_pipeline(TINY_SCORE), run_dir, engine=engine, log=quiet).run()
    assert engine.llm is llm  # the whole pipeline ran on one engine, never restarted
    return run_dir, results, engine.weight_loads - loads


def test_score_pipeline_writes_both_attempts_and_rewards(score_run):
    run_dir, results, _ = score_run
    r1 = run_dir / "round_001"
    assert sorted(p.name for p in (run_dir / "round_000").iterdir()) == ["evaluate"]  # round 0: evaluating stages
    for stage in STAGES:
        assert read_json(r1 / stage / "manifest.json")["done"], stage
    for stage, objective in (("stage1", "score_stage1"), ("stage2", "score_stage2")):
        rows = load_rows(r1 / stage / "data")
        assert len(rows) == 2 * 3 * 2  # steps × problems × samples
        assert all(len(r["attempts"]) == 2 for r in rows)
        assert all(r["attempts"][1]["prompt"] == second_prompt(r["prompt"], r["attempts"][0]["completion"], INSTRUCTION)
                   for r in rows)
        # scores come from the plugin critic (length in characters), per attempt; rewards from the stage's
        # objective (its values: test_baselines.py). Stage I rewards attempt 2 only; stage II pays attempt 1 its
        # score and attempt 2 its score plus a bonus of the improvement's sign (α = 10 > 0)
        built = load_pipeline(TINY_SCORE).config.stages[stage].config.objective.build()
        for r in rows:
            s1, s2 = (float(len(a["completion"])) for a in r["attempts"])
            assert r["scores"] == [s1, s2]
            assert r["rewards"] == built.rewards([s1, s2])
            if stage == "stage1":
                assert r["rewards"] == [None, s2]
            else:
                bonus = r["rewards"][1] - s2
                assert r["rewards"][0] == s1 and (bonus > 0) == (s2 > s1) and (bonus < 0) == (s2 < s1)
        if stage == "stage2":
            assert built.rewards([3.0, 5.0]) == [3.0, 25.0] and built.rewards([5.0, 3.0]) == [5.0, -17.0]  # by hand
        steps = [read_json(p) for p in sorted((r1 / stage / "versions").glob("*/step.json"))]
        assert [s["step"] for s in steps] == [0, 1]
        assert (r1 / stage / "steps.jsonl").read_text().count("\n") == 2
        assert all("kl/attempt1" in s and "kl/attempt2" in s for s in steps)
        assert read_json(r1 / stage / "manifest.json")["metrics"]["objective"] == objective
    # stage II starts from stage I's final policy
    s1 = read_json(r1 / "stage1" / "weights.json")
    assert adapter_hash(r1 / "stage2" / "versions" / "00000" / "adapter") == s1["adapter_hash"]


def test_score_stages_change_the_policy_and_the_engine_serves_it(score_run, engine, tiny_model):
    """Both stages moved the weights, and what the running engine serves for them equals a fresh transformers
    forward pass on the merged weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfimprove.engines.merge import merged_folder

    run_dir, _, loads = score_run
    assert loads >= 4  # at least one in-place reload per step version served
    tok = AutoTokenizer.from_pretrained(tiny_model)
    choice = "The answer is 42."
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids, cids = tok.encode(text, add_special_tokens=False), tok.encode(choice, add_special_tokens=False)
    served = {}
    for stage in ("stage1", "stage2"):
        folder = run_dir / "round_001" / stage
        assert adapter_hash(folder / "adapter") != adapter_hash(folder / "versions" / "00000" / "adapter")
        weights = Weights(tiny_model, str(folder / "adapter"), stage)
        served[stage] = engine.choice_logprobs([PROMPT], [choice], weights)[0][choice]
        model = AutoModelForCausalLM.from_pretrained(merged_folder(weights), dtype="float32")
        with torch.no_grad():
            logps = model(torch.tensor([ids + cids])).logits[0].log_softmax(-1)
        fresh = sum(logps[len(ids) - 1 + j, c].item() for j, c in enumerate(cids))
        assert served[stage] == pytest.approx(fresh, abs=2e-3)
    base = engine.choice_logprobs([PROMPT], [choice], Weights(tiny_model))[0][choice]
    assert abs(served["stage1"] - base) > 1e-3 and abs(served["stage2"] - served["stage1"]) > 1e-3


def test_self_correction_metrics_in_both_evaluations(score_run):
    run_dir, _, _ = score_run
    base = read_json(run_dir / "round_000" / "evaluate" / "manifest.json")["metrics"]
    after = read_json(run_dir / "round_001" / "evaluate" / "manifest.json")["metrics"]
    assert base["weights"] == "base" and after["weights"] == "round_001/stage2"
    from selfimprove.tasks.arithmetic import Arithmetic

    task = load_pipeline(TINY_SCORE).config.task.build()
    assert isinstance(task, Arithmetic)
    for round_index, m in ((0, base), (1, after)):
        assert m["problems"] == 6 and m["samples"] == 6
        rows = load_rows(run_dir / f"round_{round_index:03d}" / "evaluate" / "data")
        # each attempt graded by the task, and the metrics are exactly those of the saved rows
        for r in rows:
            assert [a["correct"] for a in r["attempts"]] == [task.grade(r, a["completion"]).strict for a in r["attempts"]]
        # the metrics count the saved rows (one sample per problem): accuracies are shares of right attempts, and
        # Δ(t1,t2) = Acc@t2 − Acc@t1 = Δi→c − Δc→i
        first, second = [sum(r["attempts"][k]["correct"] for r in rows) for k in (0, 1)]
        fixed = sum(not r["attempts"][0]["correct"] and r["attempts"][1]["correct"] for r in rows)
        broken = sum(r["attempts"][0]["correct"] and not r["attempts"][1]["correct"] for r in rows)
        assert (m["accuracy@t1"], m["accuracy@t2"]) == (pytest.approx(first / 6), pytest.approx(second / 6))
        assert (m["delta_i_to_c"], m["delta_c_to_i"]) == (pytest.approx(fixed / 6), pytest.approx(broken / 6))
        assert m["delta_t1_t2"] == pytest.approx(m["accuracy@t2"] - m["accuracy@t1"])
        for name in ("accuracy@t1", "accuracy@t2", "delta_i_to_c", "delta_c_to_i"):
            assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"]


def test_interrupted_rl_stage_resumes_without_repeating_steps(score_run, engine, tmp_path):
    """Cut stage II back to its state after step 0 (as a kill during step 1 leaves it) and re-run: step 0 is kept,
    step 1 is redone with the same seeds and gives the same policy."""
    run_dir, _, _ = score_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    stage2 = copy / "round_001" / "stage2"
    want = adapter_hash(stage2 / "adapter")
    kept = (stage2 / "versions" / "00001" / "step.json").stat().st_mtime
    for name in ("manifest.json", "weights.json"):
        (stage2 / name).unlink()
    for name in ("adapter", "data", "versions/00002"):
        shutil.rmtree(stage2 / name)
    shutil.rmtree(copy / "round_001" / "evaluate")
    logs = []
    Runner(load_pipeline(TINY_SCORE), copy, engine=engine, log=logs.append).run()
    assert (stage2 / "versions" / "00001" / "step.json").stat().st_mtime == kept
    assert sum("done, skipped" in str(line) for line in logs) == 2  # round 0's evaluate, stage1
    assert adapter_hash(stage2 / "adapter") == want
    assert len(load_rows(stage2 / "data")) == 12


def test_report_shows_self_correction_metrics_and_rl_steps(score_run):
    from selfimprove.report import markdown_table, rl_steps

    run_dir, _, _ = score_run
    text = markdown_table(run_dir)
    header = text.splitlines()[0]
    for column in ("Acc@t1", "Acc@t2", "Δ(t1,t2)", "Δi→c", "Δc→i", "RL reward"):
        assert column in header, column
    assert "accuracy [95% CI]" not in header  # no single-attempt evaluation in this run: its columns are dropped
    rows = text.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "1"]
    assert "2 RL steps, 2 RL steps" in rows[1]
    steps = rl_steps(run_dir)
    assert [(s["round"], s["stage"], s["step"]) for s in steps] == [
        (1, "stage1", 0), (1, "stage1", 1), (1, "stage2", 0), (1, "stage2", 1)]
    report = (run_dir / "report.md").read_text()
    assert "plots/accuracy.png" in report and "plots/rl.png" in report
    assert (run_dir / "plots" / "rl.png").stat().st_size > 0
