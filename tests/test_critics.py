"""Critics on fixed samples, plugin loading, composition, failure handling and critic quality (no model here;
tests/test_critic_models.py runs the model-backed critics on the tiny model)."""

import json
import math
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import product
from pathlib import Path

import pytest

from selfimprove.artifacts import load_rows, save_rows, write_json
from selfimprove.config import ConfigError, build
from selfimprove.critics import CriticContext, Verdict
from selfimprove.registry import CriticSpec
from selfimprove.critics.quality import critic_quality
from selfimprove.metrics import auroc_interval
from selfimprove.critics.self_verify import yes_probability
from selfimprove.records import Completion, Weights
from selfimprove.pipeline import load_pipeline
from selfimprove.stages.critique import Critique
from selfimprove.tasks.gsm8k import GSM8K
from selfimprove.tasks.math import MATH500

GSM = GSM8K(GSM8K.Config())
MATH = MATH500(MATH500.Config(grading_timeout=1.0))


def sample(pid: str, completion: str, answer: str = "", k: int = 0, **extra) -> dict:
    return {"sample_id": f"{pid}/{k}", "problem_id": pid, "index": k, "question": f"question {pid}",
            "answer": answer, "prompt": [{"role": "user", "content": f"question {pid}"}],
            "completion": completion, **extra}


def judge(spec: dict, samples: list[dict], task=GSM, engine=None) -> list[Verdict]:
    context = CriticContext(task=task, engine=(lambda: engine), weights=Weights("model"))
    return CriticSpec.from_config(spec, "test", "critic").build(context).judge(samples)


# -- answer ------------------------------------------------------------------------------------------------------
def test_answer_critic_gsm8k_edge_cases():
    samples = [sample("a", "The answer is 1,080.", "1080"), sample("b", "", "5"), sample("c", "The answer is N.", "5"),
               sample("d", "The answer is 123456789012345678901234567890.", "123456789012345678901234567890"),
               sample("e", "It is 5", "5")]
    strict = judge({"name": "answer"}, samples)
    assert [v.label for v in strict] == [True, False, False, True, False]
    assert [v.score for v in strict] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert [v.label for v in judge({"name": "answer", "mode": "flexible"}, samples)] == [True, False, False, True, True]


def test_answer_critic_math():
    samples = [sample("a", "so \\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"), sample("b", "\\boxed{\\frac{1}{2}", "\\frac{1}{2}"),
               sample("c", "", "3"), sample("d", "\\boxed{x^2+2x+1}", "(x+1)^2"),
               sample("e", "\\boxed{10^{100}}", "10^{100}"), sample("f", "\\boxed{10^{100}+1}", "10^{100}")]
    assert [v.label for v in judge({"name": "answer"}, samples, task=MATH)] == [True, False, False, True, True, False]


# -- majority ----------------------------------------------------------------------------------------------------
def test_majority_vote_gsm8k():
    samples = [sample("p", t, "999", k) for k, t in enumerate(
        ["The answer is 5.", "The answer is 5.0", "The answer is 7.", "I give up", "The answer is 1,000."])]
    samples += [sample("q", "no idea", "1", 0), sample("q", "none", "1", 1)]
    samples += [sample("r", "The answer is 3.", "3", 0), sample("r", "The answer is 4.", "3", 1)]
    out = judge({"name": "majority"}, samples)
    assert [v.label for v in out[:5]] == [True, True, False, False, False]  # gold (999) is never read
    assert [v.score for v in out[:5]] == [0.4, 0.4, 0.2, 0.0, 0.2]
    assert [(v.label, v.score) for v in out[5:7]] == [(False, 0.0), (False, 0.0)]
    assert [v.label for v in out[7:]] == [True, False]  # a tie goes to the answer seen first
    assert not any(v.label for v in judge({"name": "majority", "min_share": 0.5}, samples[:5]))
    # TTRL's reward: 1 for agreeing with the majority (5, which "5.0" is), 0 otherwise
    assert [v.score for v in judge({"name": "majority", "score": "agreement"}, samples)] == [1, 1, 0, 0, 0, 0, 0, 1, 0]


def test_majority_vote_math_equivalent_answers():
    texts = ["\\boxed{\\frac{1}{2}}", "\\boxed{\\dfrac{1}{2}}", "\\boxed{\\frac{2}{4}}", "\\boxed{3}", ""]
    out = judge({"name": "majority"}, [sample("m", t, "", k) for k, t in enumerate(texts)], task=MATH)
    # \frac and \dfrac vote together (2 of 5); 2/4 is a different string, but the task's grader accepts it
    assert [v.label for v in out] == [True, True, True, False, False]
    assert [v.score for v in out] == [0.4, 0.4, 0.2, 0.2, 0.0]


# -- self-verification (engine stub; the real engine is in test_critic_models.py) -----------------------------------
class StubEngine:
    def __init__(self, yes=-0.5, no=-1.5, reply="Score: 8"):
        self.yes, self.no, self.reply, self.calls = yes, no, reply, []

    def choice_logprobs(self, prompts, choices, weights):
        self.calls.append(prompts)
        return [{choices[0]: self.yes, choices[1]: self.no} for _ in prompts]

    def generate(self, prompts, sampling, weights, seed, progress=None):
        self.calls.append(prompts)
        replies = self.reply if isinstance(self.reply, list) else [self.reply] * len(prompts)
        return [[Completion(r, "stop", 3)] for r in replies]


def test_self_verify_reads_yes_probability():
    engine = StubEngine(yes=-0.5, no=-1.5)
    out = judge({"name": "self_verify", "threshold": 0.6}, [sample("a", "The answer is 4.", "4")], engine=engine)
    assert out[0].score == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert out[0].label is True
    conversation = engine.calls[0][0]
    assert [m["role"] for m in conversation] == ["user", "assistant", "user"]
    assert conversation[1]["content"] == "The answer is 4." and "Yes or No" in conversation[2]["content"]
    assert yes_probability({"Yes": -1000.0, "No": 0.0}, "Yes", "No") == 0.0
    assert yes_probability({"Yes": 0.0, "No": -1000.0}, "Yes", "No") == 1.0


# -- LLM judge ---------------------------------------------------------------------------------------------------
def test_llm_judge_parser_and_template():
    engine = StubEngine(reply=["Looks right. Score: 10", "score = 4", "Score: 3 ... on reflection Score: 9", "no idea",
                               "Score: 42"])
    samples = [sample(p, "The answer is 1.", "1") for p in "abcde"]
    out = judge({"name": "llm_judge", "template": "Q: {question}\nA: {completion}\nGold: {answer}"}, samples,
                engine=engine)
    assert [v.score for v in out[:3]] == [1.0, pytest.approx(3 / 9), pytest.approx(8 / 9)]
    assert [v.label for v in out[:3]] == [True, False, True]
    assert out[3].score is None and "no score" in out[3].error
    # "42" on a 1-10 scale is an invalid verdict, not full marks (clipping it rewarded gaming the judge)
    assert out[4].score is None and out[4].label is None and "off its scale" in out[4].error
    assert engine.calls[0][0] == [{"role": "user", "content": "Q: question a\nA: The answer is 1.\nGold: 1"}]
    with pytest.raises(KeyError, match=r"\{gold\} is not a sample column"):
        judge({"name": "llm_judge", "template": "{gold}"}, samples, engine=engine)


@pytest.mark.parametrize("params, message", [
    ({"scale": [10, 1]}, "low < high"),
    ({"score_pattern": "Score: \\d+"}, "needs a group"),
    ({"backend": "openai"}, r"critic.backend.model: required key is missing"),
    ({"backend": {"name": "openai", "model": "m", "concurrency": 0}}, "concurrency must be >= 1"),
    ({"backend": {"name": "vllm", "model": "m", "engine": {"name": "vllm", "max_model_lenn": 5}}}, "unknown key"),
    ({"backend": {"name": "vllm", "model": "tiny-random-lama"}},
     r"critic.backend: unknown model 'tiny-random-lama'; did you mean 'tiny-random-llama'\?"),
    ({"backend": {"model": "m"}}, r"judge backend 'policy' takes no parameters, got \['model'\]"),
    ({"model": "m"}, r"critic.model: unknown key; valid keys of LLMJudgeCritic.Config: backend, "),
    ({"backend": "opneai"}, r"critic.backend: unknown judge backend 'opneai'; did you mean 'openai'\? valid names: "
                            r"openai, policy, vllm \(or a dotted path package.module:Name to your own\)"),
])
def test_llm_judge_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        CriticSpec.from_config({"name": "llm_judge", **params}, "test", "critic")


class JudgeEndpoint(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/chat/completions on 127.0.0.1."""

    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        JudgeEndpoint.seen.append((self.path, self.headers.get("Authorization"), body))
        question = body["messages"][-1]["content"]
        if "fail" in question:
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "bad request", "type": "invalid_request_error"}}')
            return
        reply = "Score: 9" if "right" in question else "I cannot say."
        payload = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": reply}}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_llm_judge_backend_of_your_own():
    """A dotted path names a JudgeBackend subclass; its parameters are checked like any component's."""
    spec = {"name": "llm_judge", "template": "{completion}", "backend": {"name": "tests.plugins:FixedScoreJudge",
                                                                        "score": 4}}
    out = judge(spec, [sample("a", "fine"), sample("b", "fail")])
    assert out[0].score == pytest.approx(3 / 9) and out[0].label is False and out[0].rationale == "Score: 4"
    assert out[1].score is None and out[1].error == "refused"
    with pytest.raises(ConfigError, match=r"critic.backend.scor: unknown key; valid keys of FixedScoreJudge.Config: "
                                          r"score"):
        judge({**spec, "backend": {"name": "tests.plugins:FixedScoreJudge", "scor": 4}}, [])


def test_llm_judge_openai_endpoint(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        spec = {"name": "llm_judge", "template": "{completion}", "backend": {
            "name": "openai", "model": "judge-1", "api_key_env": "TEST_JUDGE_KEY", "max_retries": 0,
            "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "request_timeout": 10}}
        with pytest.raises(RuntimeError, match="TEST_JUDGE_KEY"):
            judge(spec, [])
        monkeypatch.setenv("TEST_JUDGE_KEY", "secret-123")
        JudgeEndpoint.seen = []
        out = judge(spec, [sample("a", "right"), sample("b", "hmm"), sample("c", "fail")])
    finally:
        server.shutdown()
    assert out[0].score == pytest.approx(8 / 9) and out[0].label
    assert out[1].score is None and "no score" in out[1].error
    assert out[2].score is None and "400" in out[2].error  # a failed request fails only its own verdict
    assert {s[1] for s in JudgeEndpoint.seen} == {"Bearer secret-123"}
    assert {s[0] for s in JudgeEndpoint.seen} == {"/v1/chat/completions"}
    assert JudgeEndpoint.seen[0][2]["model"] == "judge-1"


def sample_with(answer_score: float, judge_score: float | None, error: str | None = None) -> dict:
    return {"verdicts": {"answer": {"score": answer_score, "label": answer_score == 1.0, "error": None},
                         "judge": {"score": judge_score, "label": None, "error": error}}}


def test_combine_gates_and_weights():
    samples = [sample_with(1.0, 0.8), sample_with(1.0, 0.5), sample_with(0.0, 0.9), sample_with(1.0, None, "boom")]
    gated = judge({"name": "combine", "gates": {"answer": 1.0, "judge": 0.7}}, samples)
    assert [v.label for v in gated] == [True, False, False, None]
    assert gated[0].score == pytest.approx(0.9) and "boom" in gated[3].error
    weighted = judge({"name": "combine", "weights": {"answer": 3, "judge": 1}, "threshold": 0.8}, samples[:3])
    assert [v.score for v in weighted] == [pytest.approx(0.95), pytest.approx(0.875), pytest.approx(0.225)]
    assert [v.label for v in weighted] == [True, True, False]
    assert judge({"name": "combine", "weights": {"judge": 1}}, samples[:1])[0].label is None  # no gate, no threshold
    with pytest.raises(ConfigError, match="needs weights or gates"):
        CriticSpec.from_config({"name": "combine"}, "test", "critic")


BASE = """
name: t
model: tiny-random-llama
task: {name: gsm8k}
stages:
  generate: {sampling: {n: 2, temperature: 0.7}}
"""


def load_critique(tmp_path, critics: str):
    path = tmp_path / "pipe.yaml"
    path.write_text(BASE + f"  critique: {{samples: generate, critics: {critics}}}\n")
    return load_pipeline(path)


def test_combine_references_are_checked_at_load(tmp_path):
    load_critique(tmp_path, "[{name: answer}, {name: majority}, {name: combine, gates: {answer: 1, majority: 0.5}}]")
    with pytest.raises(ConfigError, match=r"stages.critique: critic 'combine' refers to critic 'judge', which does not "
                                          r"run before it"):
        load_critique(tmp_path, "[{name: answer}, {name: combine, gates: {judge: 0.7}}, {name: llm_judge, id: judge}]")
    with pytest.raises(ConfigError, match=r"critic id 'answer' is used twice"):
        load_critique(tmp_path, "[{name: answer}, {name: answer, mode: flexible}]")


# -- plugins -----------------------------------------------------------------------------------------------------
def test_plugin_by_dotted_path_function_and_class():
    out = judge({"name": "tests.plugins:accept_all", "score": 0.5}, [sample("a", "x"), sample("b", "")])
    assert [(v.score, v.label) for v in out] == [(0.5, True), (0.5, False)]
    resolved = CriticSpec.from_config({"name": "selfimprove.critics.answer:AnswerCritic", "mode": "flexible"}, "test", "c")
    assert resolved.id == "selfimprove.critics.answer:AnswerCritic" and resolved.config.mode == "flexible"


@pytest.mark.parametrize("name, message", [
    ("tests.plugins:nope", "module 'tests.plugins' has no attribute 'nope'"),
    ("nopkg.critics:C", "cannot import module 'nopkg.critics'"),
    ("selfimprove.tasks.math:MATH500", "is a class but not a subclass of selfimprove.critics.Critic"),
    ("selfimprove.tasks.math:INSTRUCTION", "is neither a Critic class nor a function"),
    ("no_such_critic", "unknown critic 'no_such_critic'; valid names: answer, combine, likelihood, llm_judge, majority"),
])
def test_wrong_plugin_names_fail_with_the_reason(name, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        CriticSpec.from_config({"name": name}, "pipe.yaml", "stages.critique.critics[0]")


def test_plugin_by_entry_point(tmp_path, monkeypatch):
    """An installed package registers a critic name in the `selfimprove.critics` entry-point group."""
    (tmp_path / "myplugin_critics.py").write_text(
        "from selfimprove.critics import Verdict\n"
        "def shouting(samples, min_bangs: int = 1):\n"
        "    return [Verdict(score=float(s['completion'].count('!') >= min_bangs)) for s in samples]\n")
    dist = tmp_path / "myplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[selfimprove.critics]\nshouting = myplugin_critics:shouting\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from selfimprove.registry import CRITICS

    assert "shouting" in CRITICS.names()
    out = judge({"name": "shouting", "min_bangs": 2}, [sample("a", "hi!!"), sample("b", "hi!")])
    assert [v.score for v in out] == [1.0, 0.0]
    with pytest.raises(ConfigError, match=r"cannot be called as shouting\(samples, max_bangs=...\).*unexpected keyword"):
        CriticSpec.from_config({"name": "shouting", "max_bangs": 2}, "test", "critic")
    monkeypatch.delitem(sys.modules, "myplugin_critics", raising=False)


# -- the critique stage: failures, time limits, quality --------------------------------------------------------------
class FakeContext:
    """The StageContext the critique stage sees, over a samples dataset written to tmp_path."""

    def __init__(self, tmp_path: Path, samples: list[dict], task=GSM):
        self.round, self.stage, self.task, self.base_model = 1, "critique", task, "model"
        self.out_dir = tmp_path / "critique"
        save_rows(samples, tmp_path / "generate" / "data")
        write_json(tmp_path / "generate" / "manifest.json", {"done": True})
        self._root = tmp_path

    def seed(self, *parts):
        return 0

    def engine(self):
        raise AssertionError("no engine in these tests")

    def weights(self, which):
        return Weights("model")

    def input_dir(self, stage):
        return self._root / stage


def run_critique(tmp_path, samples, task=GSM, critics=({"name": "answer"},), quality=True, **calls):
    """The critique stage over `samples`; `calls`: batch_size, timeout, max_error_rate (CriticCalls)."""
    config = build(Critique.Config, {"critics": list(critics), "quality": quality, "calls": calls}, "test")
    stage = Critique(config, FakeContext(tmp_path, samples, task))
    metrics = stage.run()
    return metrics, load_rows(tmp_path / "critique" / "data")


def flaky(samples):
    """Raises on problem 'p3'; sleeps past any small time limit on 'p5'."""
    out = []
    for s in samples:
        if s["problem_id"] == "p3":
            raise ValueError("cannot judge p3")
        if s["problem_id"] == "p5":
            time.sleep(30)
        out.append(Verdict(score=1.0, label=True))
    return out


def batched_flaky(samples):
    if any(s["problem_id"] == "p3" for s in samples):
        raise ValueError("batch with p3")
    return [0.5 for _ in samples]


batched_flaky.batched = True


def gsm_samples(n: int = 10) -> list[dict]:
    return [sample(f"p{i}", f"The answer is {i if i % 2 else i + 1}.", str(i), k) for i in range(n) for k in range(2)]


def test_a_failing_or_hanging_sample_fails_only_its_verdict(tmp_path):
    started = time.time()
    metrics, rows = run_critique(tmp_path, gsm_samples(), critics=[{"name": "tests.test_critics:flaky"}],
                                 timeout=0.5, max_error_rate=0.5)
    assert time.time() - started < 10
    by_problem = {r["problem_id"]: r for r in rows}
    assert "ValueError: cannot judge p3" in by_problem["p3"]["error"]
    assert "timed out" in by_problem["p5"]["error"]
    assert by_problem["p4"]["error"] is None and by_problem["p4"]["label"] is True
    assert metrics["tests.test_critics:flaky/invalid"] == 4 and metrics["tests.test_critics:flaky/timeouts"] == 2
    assert metrics["invalid"] == 4 and metrics["verdicts"] == 20


def test_error_rate_past_the_limit_fails_the_stage(tmp_path):
    with pytest.raises(RuntimeError, match=r"critic 'tests.test_critics:flaky' failed on 4/20 samples \(20.0% > "
                                           r"max_error_rate 10.0%\); first error: ValueError"):
        run_critique(tmp_path, gsm_samples(), critics=[{"name": "tests.test_critics:flaky"}], timeout=0.3,
                     max_error_rate=0.1)


def test_batched_critic_fails_its_whole_batch(tmp_path):
    metrics, rows = run_critique(tmp_path, gsm_samples(), critics=[{"name": "tests.test_critics:batched_flaky"}],
                                 batch_size=4, max_error_rate=1.0)
    failed = sorted({r["problem_id"] for r in rows if r["error"]})
    assert failed == ["p2", "p3"]  # batches of 4 samples = 2 whole problems: (p2, p3) held p3
    assert metrics["tests.test_critics:batched_flaky/invalid"] == 4


def test_quality_metrics_and_earlier_verdicts(tmp_path):
    samples = gsm_samples()  # odd problems answered right, even ones wrong
    critics = [{"name": "answer"}, {"name": "tests.plugins:accept_all"},
               {"name": "combine", "id": "both", "gates": {"answer": 1.0, "tests.plugins:accept_all": 1.0}}]
    metrics, rows = run_critique(tmp_path, samples, critics=critics)
    assert metrics["gold_accuracy"] == 0.5
    assert (metrics["answer/precision"], metrics["answer/recall"], metrics["answer/auroc"]) == (1.0, 1.0, 1.0)
    accept = "tests.plugins:accept_all"
    assert (metrics[f"{accept}/precision"], metrics[f"{accept}/recall"], metrics[f"{accept}/auroc"]) == (0.5, 1.0, 0.5)
    assert metrics["both/precision"] == 1.0 and metrics["both/quality_n"] == 20
    assert sum(r["label"] for r in rows if r["critic"] == "both") == 10
    _, rows = run_critique(tmp_path / "noq", samples, critics=critics[:1], quality=False)
    assert len(rows) == 20


def test_auroc_against_brute_force():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(2, 25)
        scores = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
        gold = [rng.random() < 0.5 for _ in range(n)]
        pos = [s for s, g in zip(scores, gold) if g]
        neg = [s for s, g in zip(scores, gold) if not g]
        if not pos or not neg:
            assert auroc_interval(scores, gold)[0] is None
            continue
        brute = sum((p > q) + 0.5 * (p == q) for p, q in product(pos, neg)) / (len(pos) * len(neg))
        assert auroc_interval(scores, gold)[0] == pytest.approx(brute)


def test_precision_recall_by_hand():
    q = critic_quality(labels=[True, True, False, None, True], scores=[0.9, 0.8, 0.1, None, 0.2],
                       gold=[True, False, True, False, False])
    assert (q["precision"], q["recall"], q["n"], q["gold_positive"]) == (pytest.approx(1 / 3), 0.5, 5, 2)
    assert q["auroc"] == pytest.approx(0.5)  # scored: pos {0.9, 0.1}, neg {0.8, 0.2} → 2 of 4 pairs
    empty = critic_quality(labels=[False, False], scores=[0.1, 0.2], gold=[False, False])
    assert (empty["precision"], empty["recall"], empty["auroc"]) == (None, None, None)


def test_benchmark_pipeline_loads():
    """benchmarks/critic_quality.yaml is a pipeline too: it must load (and its MATH variant as well)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "critic_quality.yaml"
    assert [s.name for s in load_pipeline(path).stages] == ["generate", "critique"]
    assert load_pipeline(path, ["task={name: math500}"]).config.task.target is MATH500


def test_model_critics_judge_each_sample_with_the_weights_that_wrote_it():
    """Samples written by two different adapters are judged with those adapters, not with the round's policy."""
    from selfimprove.critics.calls import CriticCalls, judge_all

    class RecordingEngine:
        def __init__(self):
            self.calls = []

        def choice_logprobs(self, prompts, choices, weights):
            self.calls.append((weights.adapter_hash, len(prompts)))
            return [{choices[0]: -0.1, choices[1]: -2.0} for _ in prompts]

    engine = RecordingEngine()
    a = Weights.from_dict({"base": "m", "adapter": "/a", "label": "round_001/train", "adapter_hash": "aaaa"})
    b = Weights.from_dict({"base": "m", "adapter": "/b", "label": "round_002/train", "adapter_hash": "bbbb"})
    samples = [sample(f"p{i}", "The answer is 4.", "4", weights=w.to_dict()) for i, w in enumerate([a, b, a, b, b])]
    critic = CriticSpec.from_config("self_verify", "test", "critic").build(
        CriticContext(task=GSM, engine=lambda: engine, weights=Weights("m", "/policy", "policy", "pppp")))
    verdicts, _ = judge_all(critic, samples, CriticCalls())
    assert len(verdicts) == 5 and all(v.label for v in verdicts)
    assert sorted(engine.calls) == [("aaaa", 2), ("bbbb", 3)]  # never the policy's "pppp"


def test_a_judge_key_never_reaches_the_run_directory(engine, tmp_path, monkeypatch):
    """A pipeline whose critic calls a (local, fake) OpenAI-compatible endpoint with a key from the environment:
    the key reaches the endpoint, and no file the run writes (configs, samples, verdicts, manifests, logs, report,
    the tracker's event files) holds it."""
    from selfimprove.pipeline import Runner

    canary = "sk-selfimprove-canary-7f3a9c"
    monkeypatch.setenv("CANARY_JUDGE_KEY", canary)
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    JudgeEndpoint.seen = []
    data = {"name": "secrets", "model": "tiny-random-llama", "evaluate_base": False, "report_to": ["tensorboard"],
            "engine": {"name": "vllm", "in_process": True, "adapter_mode": "merged", "max_model_len": 1024},
            "task": {"name": "arithmetic", "num_train": 40, "num_test": 6},
            "stages": {"generate": {"problems": {"num_problems": 3}, "sampling": {"max_tokens": 8}},
                       "critique": {"critics": [{
                           "name": "llm_judge", "template": "{completion} right", "backend": {
                               "name": "openai", "model": "judge-1", "max_retries": 0,
                               "api_key_env": "CANARY_JUDGE_KEY",
                               "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1"}}]}}}
    try:
        Runner(load_pipeline(None, data=data), tmp_path / "run", engine=engine, log=lambda *a: None).run()
    finally:
        server.shutdown()
    assert {s[1] for s in JudgeEndpoint.seen} == {f"Bearer {canary}"} and len(JudgeEndpoint.seen) == 3
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) > 10 and any("tfevents" in p.name for p in files)
    assert not [p for p in files if canary.encode() in p.read_bytes()]
