"""The `text` prompt format, for base models that cannot follow or end a chat turn: plain "Question: ... Answer:"
prompts, sampling stopped at the next question, and training rows in plain text through SFT and DPO."""

from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, read_json
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.records import SamplingConfig, Weights
from selfimprove.stages.rollout import sample_chunk
from selfimprove.tasks.arithmetic import INSTRUCTION, Arithmetic
from selfimprove.tasks.gsm8k import GSM8K

from .conftest import train_hard

REPO = Path(__file__).resolve().parents[1]


def quiet(*_):
    pass


def arithmetic(prompt_format: str, **kw) -> Arithmetic:
    return Arithmetic(Arithmetic.Config(num_train=60, num_test=6, num_dev=6, prompt_format=prompt_format, **kw))


def test_text_prompt_lays_out_the_instruction_the_shots_and_the_question():
    task = arithmetic("text", num_shots=1)
    (shot,) = task.problems("shots")
    problem = task.problems("test")[0]
    q, a = problem["question"], problem["answer"]
    assert task.prompt(problem) == (
        f"{INSTRUCTION}\n\n"
        f"Question: What is {shot['question']}?\nAnswer:\n{shot['solution']}\n\n"
        f"Question: What is {q}?\nAnswer:\n")
    assert task.prompt(problem, hint=True).endswith(
        f"Question: What is {q}?\n(The correct answer is {a}. Show the digit-by-digit steps that reach it.)\n"
        f"Answer:\n")
    assert task.stop() == ("\nQuestion:",)
    assert arithmetic("chat").stop() == () and arithmetic("fewshot").stop() == ()
    assert isinstance(arithmetic("fewshot").prompt(problem), list)  # the chat formats are unchanged


def test_published_tasks_show_their_train_solutions_as_text_shots():
    task = GSM8K(GSM8K.Config(prompt_format="text", num_shots=2))
    first, second = task.problems("train")[:2]
    prompt = task.prompt(task.problems("test")[0])
    assert prompt.count("Question: ") == 3 and prompt.endswith("\nAnswer:\n")
    assert f"Question: {first['question']}\nAnswer:\n{first['solution']}\n\n" in prompt
    assert prompt.index(first["solution"]) < prompt.index(second["question"])


def test_unknown_prompt_format_is_refused():
    with pytest.raises(Exception, match="prompt_format"):
        load_pipeline(REPO / "tests" / "pipelines" / "tiny_star.yaml", ["task.prompt_format=plain"])


@pytest.fixture(scope="module")
def rambling_adapter(tiny_model, tmp_path_factory) -> str:
    """An adapter trained on text prompts to answer and then go on to the next question, as base models do."""
    task = arithmetic("text", num_shots=0)
    rows = [{"prompt": task.prompt(p), "completion": "The answer is 42.\nQuestion: What is 1 + 1?"}
            for p in task.problems("train")]
    return train_hard(tiny_model, rows, tmp_path_factory.mktemp("rambling"))  # SFT takes plain-text rows


def test_sampling_from_text_prompts_stops_at_the_next_question(engine, tiny_model, rambling_adapter):
    task = arithmetic("text", num_shots=0)
    problems = task.problems("test")[:3]
    weights = Weights(tiny_model, rambling_adapter, "rambling")
    greedy = SamplingConfig(max_tokens=24)
    # without the task's stop the model runs on into the next question (so the check below can fail)
    unstopped = engine.generate([task.prompt(p) for p in problems], greedy, weights, seed=0)
    assert all(out[0].text.startswith("The answer is 42.\nQuestion:") for out in unstopped)
    rows = sample_chunk(engine=engine, task=task, problems=problems, sampling=greedy, weights=weights, seeds=[0],
                        id_prefix="t")
    assert [r["completion"] for r in rows] == ["The answer is 42."] * 3
    assert {r["finish_reason"] for r in rows} == {"stop"}
    assert greedy.stop == []  # the task's stop was added to a copy, not to the stage's sampling


@pytest.mark.parametrize("pipeline, data", [("tiny_star.yaml", ("filter", "completion")),
                                            ("tiny_dpo.yaml", ("pairs", "chosen"))])
def test_text_prompts_train_through_sft_and_dpo(engine, tmp_path, pipeline, data):
    run = tmp_path / "run"
    Runner(load_pipeline(REPO / "tests" / "pipelines" / pipeline, ["rounds=1", "task.prompt_format=text"]), run,
           engine=engine, log=quiet).run()
    stage, column = data
    rows = load_rows(run / "round_001" / stage / "data")
    assert rows and all(isinstance(r["prompt"], str) and r["prompt"].endswith("Answer:\n") for r in rows)
    assert all(isinstance(r[column], str) for r in rows)
    samples = load_rows(run / "round_001" / "generate" / "data")
    assert all("\nQuestion:" not in s["completion"] for s in samples)
    assert read_json(run / "round_001" / "train" / "weights.json")["trained"]
