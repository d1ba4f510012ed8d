"""The label-free methods' shipped pipelines on a `dataset` task whose files have no answer column, run as a user
runs them on unlabelled data (docs/tasks.md, *Label-free pipelines on your own data*): a small YAML that includes
the shipped pipeline, names the files with `columns: {answer: null}` and nulls the stages that need gold. Each
method runs end to end on the tiny random model and shows its label-free signal and nothing gold; a stage left
asking for gold is refused when the pipeline loads, naming the stage and the fix."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import yaml

from selfimprove.artifacts import is_done, load_rows, read_json
from selfimprove.cli import main
from selfimprove.config import ConfigError
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.records import Weights
from selfimprove.stages.rl import RL

from .conftest import REPO, TINY

# Sums with no answers: 24 train problems (a quarter held out as dev, where the judge is measured), 4 test ones.
TRAIN = [f"What is {a} + {b}?" for a, b in [(12, 30), (45, 17), (8, 9), (23, 61), (70, 5), (14, 14), (33, 48),
                                             (52, 26), (9, 91), (16, 27), (40, 44), (63, 18), (21, 35), (77, 12),
                                             (6, 58), (31, 31), (48, 7), (19, 66), (25, 25), (81, 4), (37, 29),
                                             (13, 72), (54, 38), (60, 15)]]
TEST = ["What is 3 + 4?", "What is 11 + 22?", "What is 50 + 6?", "What is 29 + 13?"]

# What the shipped pipelines need besides the data on label-free files: no evaluate stage (it grades against
# gold), and for the judge's, its critique without the `answer` critic (kept there only to measure the judges).
JUDGE_CRITICS = [{"name": "self_verify", "id": "judge", "weights": "judge_train"}, {"name": "self_verify", "id": "own"}]
LABEL_FREE = {
    "ttrl_arithmetic": {}, "ttrl_arithmetic_testtime": {}, "sharpen_sft_arithmetic": {}, "sharpen_rl_arithmetic": {},
    "self_rewarding_judge_arithmetic": {"critique": {"critics": JUDGE_CRITICS}},
    "tiny_self_rewarding_judge": {"critique": {"critics": JUDGE_CRITICS}},
}

# Tiny sizes for the tiny random model, as command-line overrides.
TINY_LORA = "{r: 4, alpha: 8}"
TINY_RL = [f"model={TINY}", "rounds=1", "stages.rl.steps=2", "stages.rl.problems_per_step=3",
           "stages.rl.sampling={n: 4, temperature: 1.0, max_tokens: 8}", f"stages.rl.trainer.lora={TINY_LORA}",
           "stages.rl.trainer.learning_rate=5.0e-3", "stages.rl.trainer.micro_batch_size=12"]


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The unlabelled files: one `question` column, no answer column at all."""
    folder = tmp_path_factory.mktemp("unlabelled")
    for split, questions in (("train", TRAIN), ("test", TEST)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    return folder


def users_yaml(folder, shipped: str, stages: dict | None = None, evaluate=None) -> str:
    """The YAML a user writes to run a shipped pipeline on their unlabelled files: docs/tasks.md's example, on
    `shipped`, with `stages` added and the evaluate stage as given (the example nulls it)."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "tasks.md").read_text(), flags=re.S)
    (config,) = [yaml.safe_load(b) for b in blocks if b.startswith("# ttrl-on-my-data.yaml")]
    assert config["stages"] == {"evaluate": None} and config["task"]["columns"] == {"answer": None}
    config.update(include=shipped, name=f"{shipped}-unlabelled")
    for split in ("train", "test"):
        config["task"][split]["path"] = str(folder / f"{split}.jsonl")
    config["stages"] = {"evaluate": evaluate, **(stages or {})}
    path = folder / f"{shipped}-unlabelled.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def run(data, tmp_path, shipped: str, overrides: list[str], engine):
    pipeline = load_pipeline(users_yaml(data, shipped, LABEL_FREE[shipped]), overrides)
    runner = Runner(pipeline, tmp_path / "run", engine=engine, log=quiet)
    runner.run()
    done = {(r, s) for r in range(3) for s in pipeline.config.stages if is_done(runner.stage_dir(r, s))}
    return runner, done


def no_gold(rows: list[dict]) -> bool:
    """Every row carries its problem's (empty) answer: none was read from the files."""
    return all(r["answer"] == "" for r in rows)


# -- checked before any model loads ------------------------------------------------------------------------------
@pytest.mark.parametrize("shipped", sorted(LABEL_FREE))
def test_selfimprove_run_check_accepts_each_label_free_pipeline_on_unlabelled_files(shipped, data, capsys):
    assert main(["run", users_yaml(data, shipped, LABEL_FREE[shipped]), "--check"]) == 0
    assert "ok (" in capsys.readouterr().out


def test_a_stage_still_asking_for_gold_is_refused_naming_the_stage_and_the_fix(data, capsys):
    def refused(path, overrides=()):
        with pytest.raises(ConfigError) as err:
            load_pipeline(path, list(overrides))
        return str(err.value)

    gold_stage = "needs gold answers, and task 'dataset' has none (label-free data): give the task its answer column " \
                 "(task.columns.answer), or "
    # the shipped evaluate stage, left in
    kept = users_yaml(data, "ttrl_arithmetic", evaluate={})
    assert f"stages.evaluate: stage 'evaluate' {gold_stage}drop the stage (set it to null)" in refused(kept)
    assert main(["run", kept, "--check"]) == 2 and "stages.evaluate: stage 'evaluate'" in capsys.readouterr().err
    assert main(["run", kept, "stages.evaluate=null", "--check"]) == 0  # the override drops it
    # an rl stage rewarded by the answer check (the rl stage's default critic, which grpo_arithmetic keeps)
    assert (f"stages.rl: stage 'rl' {gold_stage}reward with a label-free critic (critic: majority, or likelihood): "
            f"critic 'answer' grades against gold") in refused(users_yaml(data, "ttrl_arithmetic"),
                                                               ["stages.rl.critic=answer"])
    assert "stages.rl: stage 'rl'" in refused(users_yaml(data, "grpo_arithmetic"))
    # the judge pipeline's critique with its answer critic still in it
    assert (f"stages.critique: stage 'critique' {gold_stage}take critic 'answer' out of critics: (it grades against "
            f"gold)") in refused(users_yaml(data, "tiny_self_rewarding_judge"))
    # a critic that grades against gold under another id, among label-free ones
    assert "take critic 'gold' out of critics:" in refused(
        users_yaml(data, "sharpen_sft_arithmetic"),
        ["stages.critique.critics=[{name: likelihood}, {name: answer, id: gold}]"])


# -- end to end on the tiny model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shipped, questions", [("ttrl_arithmetic", TRAIN), ("ttrl_arithmetic_testtime", TEST)])
def test_ttrl_on_unlabelled_data_rewards_agreement_with_the_vote_and_logs_no_gold_metric(shipped, questions, engine, data,
                                                                                tmp_path):
    runner, done = run(data, tmp_path, shipped, TINY_RL, engine)
    assert done == {(1, "rl")}  # no evaluating stage: round 0 runs nothing
    rl = runner.stage_dir(1, "rl")
    for step in (1, 2):
        metrics = read_json(rl / "versions" / f"{step:05d}" / "step.json")
        rows = load_rows(rl / "versions" / f"{step:05d}" / "rollouts")
        assert no_gold(rows) and {r["question"] for r in rows} <= set(questions)
        assert set(Counter(r["problem_id"] for r in rows).values()) == {4}  # a group of 4 samples per problem
        # each sample's reward is 1 when its answer is its problem's most voted one (the first seen of equal
        # counts), else 0 (TTRL's reward)
        answers = [runner.task.grade(r, r["completion"]).answer for r in rows]
        votes = {pid: Counter(a for r, a in zip(rows, answers) if r["problem_id"] == pid and a is not None)
                 for pid in {r["problem_id"] for r in rows}}
        winner = {pid: max(v, key=v.get) if v else None for pid, v in votes.items()}
        assert [r["scores"] for r in rows] == [[float(a is not None and a == winner[r["problem_id"]])]
                                               for r, a in zip(rows, answers)]
        winners = [max(v.values(), default=0) / 4 for v in votes.values()]
        assert metrics["majority/majority_ratio"] == pytest.approx(sum(winners) / len(winners))
        # against gold: nothing to compare with, so nothing is reported (None, not a number)
        assert metrics["majority/label_accuracy"] is None and metrics["majority/reward_accuracy"] is None
    manifest = read_json(rl / "manifest.json")["metrics"]
    assert manifest["majority/majority_ratio/mean"] is not None and manifest["majority/label_accuracy/mean"] is None
    signal = RL.report(manifest)["critic signal (mean over steps)"]
    assert "majority_ratio" in signal and "accuracy" not in signal


def test_rl_sharpening_on_unlabelled_data_rewards_the_policys_own_likelihood(engine, data, tmp_path):
    runner, done = run(data, tmp_path, "sharpen_rl_arithmetic", TINY_RL, engine)
    assert done == {(1, "rl")}
    rl = runner.stage_dir(1, "rl")
    for step in (1, 2):
        metrics = read_json(rl / "versions" / f"{step:05d}" / "step.json")
        rows = load_rows(rl / "versions" / f"{step:05d}" / "rollouts")
        assert no_gold(rows) and metrics["likelihood/auroc"] is None  # no gold to rank against
        # the reward is the mean log-probability per sampled token under the weights that sampled it (this step's
        # policy version), at temperature 1
        row = next(r for r in rows if r["completion"])
        [logprob] = engine.choice_logprobs([row["prompt"]], [row["completion"]], Weights.from_dict(row["weights"]))
        tokens = len(row["token_ids"]) if row.get("token_ids") else row["num_tokens"]
        assert row["scores"] == [pytest.approx(logprob[row["completion"]] / tokens, abs=1e-4)]
        assert row["weights"]["label"].endswith(f"/rl/v{step - 1}")
    assert "critic signal (mean over steps)" not in RL.report(read_json(rl / "manifest.json")["metrics"])


def test_sft_sharpening_on_unlabelled_data_keeps_each_problems_most_likely_sample(engine, data, tmp_path):
    overrides = [f"model={TINY}", "rounds=1", "stages.generate.problems.num_problems=4",
                 "stages.generate.sampling={n: 3, temperature: 1.0, max_tokens: 8}",
                 f"stages.train.trainer.lora={TINY_LORA}",
                 "stages.train.trainer.optim={max_steps: 2, learning_rate: 1.0e-3, batch_size: 4, max_length: 512}"]
    runner, done = run(data, tmp_path, "sharpen_sft_arithmetic", overrides, engine)
    assert done == {(1, s) for s in ("generate", "critique", "filter", "train")}
    samples = load_rows(runner.stage_dir(1, "generate") / "data")
    verdicts = load_rows(runner.stage_dir(1, "critique") / "data")
    assert no_gold(samples) and len(samples) == 4 * 3 and len(verdicts) == len(samples)
    # the score is the policy's own mean log-probability per sampled token of the text, at temperature 1
    by_id = {s["sample_id"]: s for s in samples}
    first = by_id[verdicts[0]["sample_id"]]
    [logprob] = engine.choice_logprobs([first["prompt"]], [first["completion"]], Weights.from_dict(first["weights"]))
    tokens = len(first["token_ids"]) if first.get("token_ids") else first["num_tokens"]
    assert verdicts[0]["score"] == pytest.approx(logprob[first["completion"]] / tokens, abs=1e-4)
    assert all(v["score"] is None or v["score"] < 0 for v in verdicts)
    critique = read_json(runner.stage_dir(1, "critique") / "manifest.json")["metrics"]
    # scores without labels, and no gold to measure them against
    assert critique["likelihood/unlabelled"] == len(samples) - critique["likelihood/invalid"]
    assert "gold_accuracy" not in critique and "likelihood/auroc" not in critique
    # SFT-Sharpening's data: per problem, its highest-scored sample (the first of equal scores)
    best = {}
    for v in verdicts:
        pid = by_id[v["sample_id"]]["problem_id"]
        if v["score"] is not None and (pid not in best or v["score"] > best[pid][0]):
            best[pid] = (v["score"], v["sample_id"])
    kept = load_rows(runner.stage_dir(1, "filter") / "data")
    assert sorted(r["sample_ids"][0] for r in kept) == sorted(sid for _, sid in best.values())
    assert read_json(runner.stage_dir(1, "train") / "weights.json")["trained"]


def test_a_judge_that_learns_on_unlabelled_data_trains_on_the_pairs_it_ranked_right(engine, data, tmp_path):
    runner, done = run(data, tmp_path, "tiny_self_rewarding_judge", ["stages.judge_data.measure.num_problems=4"],
                       engine)
    stages = ("judge_data", "judge_train", "generate", "critique", "pairs", "train")
    assert done == {(r, s) for r in (1, 2) for s in stages}
    ask = {"role": "user", "content": "Is the answer above correct? Answer Yes or No."}
    trained_on = 0
    for round_index, judge in ((1, "base"), (2, "round_001/judge_train")):
        judge_data = runner.stage_dir(round_index, "judge_data")
        metrics = read_json(judge_data / "manifest.json")["metrics"]
        assert metrics["judge_weights"] == judge
        assert metrics["measured"] == 4 and metrics["problems"] == 6  # dev pairs measure, train pairs teach
        assert metrics["judge/gold_auroc"] is None and "judge/gold_accuracy" not in metrics
        pairs = load_rows(judge_data / "pairs")
        assert [p["measured"] for p in pairs] == [True] * 4 + [False] * 6
        for p in pairs:  # the worse side answered the question with one digit changed
            question = p["prompt"][-1]["content"]
            changed = [(a, b) for a, b in zip(question[-len(p["perturbed_question"]):], p["perturbed_question"])
                       if a != b]
            assert len(changed) == 1 and all(c.isdigit() for c in changed[0])
        # the judge's training rows, worked out from the pairs: for each training pair its judge scored in the
        # right order, the conversation about each side of the original question with the reply it should give
        expected = [(p["prompt"] + [{"role": "assistant", "content": text}, ask], reply)
                    for p in pairs if not p["measured"] and p["better_score"] > p["worse_score"]
                    for text, reply in ((p["better"], "Yes"), (p["worse"], "No"))]
        rows = load_rows(judge_data / "data")
        assert [(r["prompt"], r["completion"][0]["content"]) for r in rows] == expected
        trained_on += len(rows)
        assert no_gold(load_rows(runner.stage_dir(round_index, "generate") / "data"))
        critique = read_json(runner.stage_dir(round_index, "critique") / "manifest.json")["metrics"]
        assert "gold_accuracy" not in critique and not any(k.endswith("/auroc") for k in critique)
        assert read_json(runner.stage_dir(round_index, "pairs") / "manifest.json")["metrics"]["pairs"] > 0
    assert trained_on > 0  # the comparison above is not between two empty lists
