"""Model-backed critics and MATH evaluation on the tiny model: real vLLM (the shared engine), transformers, and
a judge engine of its own in a subprocess."""

import json
import math
import subprocess
import sys

import pytest

from selfimprove.artifacts import load_rows, read_json
from selfimprove.critics import CriticContext
from selfimprove.registry import CriticSpec
from selfimprove.records import Weights
from selfimprove.pipeline import Runner, load_pipeline
from selfimprove.tasks.arithmetic import INSTRUCTION, Arithmetic

from .conftest import TARGET

CHAT = [[{"role": "user", "content": "Is 2 + 2 = 4? Answer Yes or No."}],
        [{"role": "user", "content": "What is 3 + 5?"}, {"role": "assistant", "content": "8"},
         {"role": "user", "content": "Sure?"}]]
CHOICES = ["Yes", "No", " The answer is"]


def build(spec: dict, engine, weights, task=None):
    return CriticSpec.from_config(spec, "test", "critic").build(CriticContext(task=task, engine=lambda: engine,
                                                                             weights=weights))


def test_choice_logprobs_vllm_agrees_with_transformers(engine, tiny_model, tiny_adapter):
    from selfimprove.engines.hf_engine import HFEngine

    base, tuned = Weights(tiny_model), Weights(tiny_model, tiny_adapter, "tuned")
    hf = HFEngine(HFEngine.Config(), tiny_model)
    ours, ref = engine.choice_logprobs(CHAT, CHOICES, base), hf.choice_logprobs(CHAT, CHOICES, base)
    assert len(ours) == 2 and all(set(row) == set(CHOICES) for row in ours)
    for a, b in zip(ours, ref):
        for choice in CHOICES:
            assert a[choice] == pytest.approx(b[choice], abs=2e-3), (choice, a, b)
            assert a[choice] < 0
    # The weights asked for are the ones scored: the adapter (trained to answer "The answer is 42.") makes its
    # opening the most likely continuation, where the base model prefers a newline. (The tiny model's
    # distributions are nearly flat, so the margins are small in absolute terms.)
    prompt = [Arithmetic(Arithmetic.Config(num_train=40, num_test=12)).prompt({"question": "12 + 30"})]
    words = TARGET.split(" 42")[0]
    tuned_lp = engine.choice_logprobs(prompt, [words, "The", "\n"], tuned)[0]
    base_lp = engine.choice_logprobs(prompt, [words, "The", "\n"], base)[0]
    assert tuned_lp[words] > base_lp[words] + 2
    assert tuned_lp["The"] > tuned_lp["\n"] and base_lp["\n"] > base_lp["The"]
    assert tuned_lp[words] == pytest.approx(hf.choice_logprobs(prompt, [words], tuned)[0][words], abs=2e-2)
    raw = engine.choice_logprobs(["1 2 3 4"], [" 5", " x"], base)
    assert all(v < 0 for v in raw[0].values())


def test_self_verify_on_vllm(engine, tiny_model):
    samples = [{"prompt": CHAT[0], "completion": c} for c in ("Yes.", "", "The answer is 4.")]
    critic = build({"name": "self_verify", "threshold": 0.5}, engine, Weights(tiny_model))
    verdicts = critic.judge(samples)
    conversations = [critic.conversation(s) for s in samples]
    expected = engine.choice_logprobs(conversations, ["Yes", "No"], Weights(tiny_model))
    for v, lp in zip(verdicts, expected):
        p = 1 / (1 + math.exp(lp["No"] - lp["Yes"]))
        assert 0 < v.score < 1 and v.score == pytest.approx(p) and v.label == (p >= 0.5)


def test_llm_judge_on_the_policy_engine(engine, tiny_model, tiny_adapter):
    """The tuned tiny model always replies "The answer is 42.": a parser reading that number as a score on
    0..100 gives 0.42 for every sample; the random base model's replies hold no score, so each verdict fails."""
    template = INSTRUCTION + "\n\nWhat is {question}?"
    spec = {"name": "llm_judge", "template": template, "score_pattern": r"answer is (\d+)", "scale": [0, 100],
            "sampling": {"max_tokens": 12}}
    samples = [{"question": q, "completion": "x"} for q in ("12 + 30", "7 + 8")]
    tuned = build(spec, engine, Weights(tiny_model, tiny_adapter, "tuned")).judge(samples)
    assert [(v.score, v.label, v.error) for v in tuned] == [(0.42, False, None)] * 2
    assert tuned[0].rationale.startswith(TARGET[:10])
    base = build(spec, engine, Weights(tiny_model)).judge(samples)
    assert all(v.score is None and "no score" in v.error for v in base)


def make_reward_model(path, tiny_model, num_labels: int):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=128, vocab_size=len(tokenizer), num_labels=num_labels,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reward_model_critic(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForSequenceClassification

    path = make_reward_model(tmp_path / "rm1", tiny_model, num_labels=1)
    samples = [{"prompt": CHAT[0], "completion": c} for c in ("Yes", "No, because 2 + 2 = 5.", "", "Yes")]
    critic = build({"name": "reward_model", "model": path, "batch_size": 3, "threshold": 0.5}, None, None)
    verdicts = critic.judge(samples)
    scores = [v.score for v in verdicts]
    assert all(0 < s < 1 for s in scores) and len(set(scores[:3])) == 3
    assert scores[0] == pytest.approx(scores[3], abs=1e-5)  # padding in another batch changes nothing
    assert [v.label for v in verdicts] == [s >= 0.5 for s in scores]
    # the same number straight from transformers, one conversation at a time
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    ids = critic.tokenizer(critic.text(samples[1]), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert scores[1] == pytest.approx(torch.sigmoid(model(**ids).logits[0, 0]).item(), abs=1e-5)
    two = make_reward_model(tmp_path / "rm2", tiny_model, num_labels=2)
    verdicts = build({"name": "reward_model", "model": two, "threshold": None}, None, None).judge(samples[:2])
    assert all(0 < v.score < 1 and v.label is None for v in verdicts)


JUDGE_SCRIPT = """
import json, sys
from selfimprove.critics import CriticContext
from selfimprove.registry import CriticSpec
from selfimprove.tasks.arithmetic import INSTRUCTION
if __name__ == "__main__":
    spec = {"name": "llm_judge", "score_pattern": r"answer is (\\d+)", "scale": [0, 100],
            "template": INSTRUCTION + "\\n\\nWhat is {question}?", "sampling": {"max_tokens": 12},
            "backend": {"name": "vllm", "model": sys.argv[1],
                        "engine": {"name": "vllm", "in_process": True, "max_model_len": 512}}}
    critic = CriticSpec.from_config(spec, "test", "critic").build(CriticContext(task=None))
    verdicts = critic.judge([{"question": "12 + 30", "completion": "42"}, {"question": "7 + 8", "completion": "5"}])
    engine_started = critic.backend.engine is not None
    critic.close()
    print("RESULT" + json.dumps({"started": engine_started, "closed": critic.backend.engine is None,
                                 "verdicts": [[v.score, v.error, v.rationale] for v in verdicts]}))
"""


def test_llm_judge_on_another_local_model(tiny_model, tiny_adapter, tmp_path):
    """backend: vllm starts an engine of its own on the judge model: here the tuned tiny model as a merged folder,
    which replies "The answer is 42." (a subprocess: one in-process vLLM engine per test session)."""
    from selfimprove.engines.merge import merged_folder

    judge_model = str(merged_folder(Weights(tiny_model, tiny_adapter, "tuned")))
    script = tmp_path / "judge.py"
    script.write_text(JUDGE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), judge_model], capture_output=True, text=True, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, proc.stderr[-3000:]
    result = json.loads(line[len("RESULT"):])
    assert result["started"] and result["closed"]
    assert [(score, error) for score, error, _ in result["verdicts"]] == [(0.42, None), (0.42, None)]
    assert all(reply.startswith(TARGET[:10]) for _, _, reply in result["verdicts"])


def test_math_pipeline_on_the_tiny_model(engine, tiny_model, tmp_path):
    """generate → critique (every label-free and gold critic, composed) → evaluate, on MATH500 through real vLLM:
    verdicts, critic-quality metrics and the subject/level breakdowns all come out."""
    data = {
        "name": "tiny-math", "model": "tiny-random-llama", "rounds": 1, "evaluate_base": False,
        "task": {"name": "math500"},
        "stages": {
            "generate": {"problems": {"num_problems": 4}, "sampling": {"n": 3, "temperature": 1.0, "max_tokens": 16}},
            "critique": {"critics": [
                {"name": "answer"}, {"name": "majority"}, {"name": "self_verify"},
                {"name": "combine", "id": "vote_and_verify", "weights": {"majority": 1, "self_verify": 1},
                 "threshold": 0.5}]},
            "evaluate": {"problems": {"num_problems": 6}, "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 16}},
        },
    }
    pipeline = load_pipeline(None, data=data)
    Runner(pipeline, tmp_path / "run", engine=engine, log=lambda *a: None).run()
    critique = read_json(tmp_path / "run" / "round_001" / "critique" / "manifest.json")["metrics"]
    verdicts = load_rows(tmp_path / "run" / "round_001" / "critique" / "data")
    assert len(verdicts) == 4 * 3 * 4 and critique["invalid"] == 0
    for critic in ("answer", "majority", "self_verify", "vote_and_verify"):
        assert critique[f"{critic}/quality_n"] == 12 and f"{critic}/precision" in critique
    assert "gold_accuracy" in critique
    evaluate = read_json(tmp_path / "run" / "round_001" / "evaluate" / "manifest.json")["metrics"]
    rows = load_rows(tmp_path / "run" / "round_001" / "evaluate" / "data")
    assert len(rows) == 12 and {"completion", "correct", "correct_flexible", "subject", "level"} <= set(rows[0])
    assert sum(v for k, v in evaluate.items() if k.startswith("by/subject=") and k.endswith("/problems")) == 6
    assert sum(v for k, v in evaluate.items() if k.startswith("by/level=") and k.endswith("/problems")) == 6
    # the statistics are those of the graded rows the stage saved, recomputed here from scratch
    from selfimprove.metrics import pass_at_k, summarize
    from selfimprove.pipeline import derive_seed

    groups = {}
    for row in rows:
        groups.setdefault(row["problem_id"], []).append(row)
    firsts = [float(min(g, key=lambda r: r["index"])["correct"]) for g in groups.values()]
    passes = [pass_at_k(len(g), sum(r["correct"] for r in g), 2) for g in groups.values()]
    seed = derive_seed(0, 1, "evaluate", "bootstrap")
    assert {k: evaluate[k] for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high")} == summarize(
        "accuracy", firsts, seed, 1000)
    assert {k: evaluate[k] for k in ("pass@2", "pass@2_ci_low", "pass@2_ci_high")} == summarize(
        "pass@2", passes, seed, 1000)
