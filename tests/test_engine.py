"""The vLLM engine on the tiny model: sampling, seeds, and both ways an adapter reaches it."""

import json
import shutil
import subprocess
import sys

from selfimprove.engines.vllm_engine import lora_id
from selfimprove.records import SamplingConfig, Weights, adapter_hash
from selfimprove.tasks.arithmetic import Arithmetic

from .conftest import TARGET

PROMPTS = [[{"role": "user", "content": f"What is {i} + {i + 1}?"}] for i in range(6)]


def texts(outputs):
    return [[c.text for c in row] for row in outputs]


def run_script(tmp_path, name: str, text: str, *args: str):
    """Run `text` as a script in its own process (an engine with another configuration) and return what it printed
    after "RESULT", as JSON."""
    script = tmp_path / name
    script.write_text(text)
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


def test_n_samples_and_seeds(engine, tiny_model):
    w = Weights(tiny_model)
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=12)
    a = engine.generate(PROMPTS, sampling, w, seed=11)
    b = engine.generate(PROMPTS, sampling, w, seed=11)
    c = engine.generate(PROMPTS, sampling, w, seed=12)
    assert len(a) == len(PROMPTS) and all(len(row) == 3 for row in a)
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert all(x.num_tokens <= 12 and x.finish_reason in ("stop", "length") for row in a for x in row)


SCHEDULING_SCRIPT = """
import json, sys
from selfimprove.engines.vllm_engine import VLLMEngine
from selfimprove.records import SamplingConfig, Weights
if __name__ == "__main__":
    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    # the real runs' layout (the engine core in its own process), scheduling 2 sequences at a time
    eng = VLLMEngine(VLLMEngine.Config(max_num_seqs=2, max_model_len=1024), model, seed=5)
    out = eng.generate(prompts, SamplingConfig(n=3, temperature=1.0, max_tokens=12), Weights(model), seed=11)
    print("RESULT" + json.dumps([[c.text for c in row] for row in out]))
    eng.close()
"""


def test_samples_do_not_depend_on_scheduling(engine, tiny_model, tmp_path):
    """A prompt's samples depend on (prompt, its index, sampling, weights, seed), not on how the engine batches
    and schedules its requests: the in-process engine with 256 sequences at a time and an engine whose core runs
    in its own process, 2 sequences at a time and started with another seed, give the same samples. With one
    global generator reseeded per call (the earlier design) the noise a request drew depended on its row in each
    step's batch, and the same run sampled differently twice."""
    there = run_script(tmp_path, "scheduling.py", SCHEDULING_SCRIPT, tiny_model, json.dumps(PROMPTS))
    here = texts(engine.generate(PROMPTS, SamplingConfig(n=3, temperature=1.0, max_tokens=12), Weights(tiny_model),
                                 seed=11))
    assert len({t for row in here for t in row}) > 6  # sampled, not one greedy answer per prompt
    assert there == here


def test_stop_strings_and_raw_prompts(engine, tiny_model):
    out = engine.generate(["1 2 3 4", "a b c"], SamplingConfig(n=2, temperature=1.0, max_tokens=30, stop=["e"]),
                          Weights(tiny_model), seed=3)
    assert all("e" not in c.text for row in out for c in row)


def test_merged_adapter_is_served_without_restart(engine, tiny_model, tiny_adapter):
    task = Arithmetic(Arithmetic.Config(num_train=40, num_test=12, prompt_format="chat"))
    prompts = [task.prompt(p) for p in task.problems("test")]
    greedy = SamplingConfig(max_tokens=10)
    llm_before = id(engine.llm)
    base = texts(engine.generate(prompts, greedy, Weights(tiny_model), seed=0))
    tuned = texts(engine.generate(prompts, greedy, Weights(tiny_model, tiny_adapter, "tuned"), seed=0))
    # a plain LoRA adapter is merged inside the running engine, not reloaded from a merged folder on disk (other
    # tests may merge the same session adapter on disk for served engines, so a folder's absence proves nothing)
    assert engine._loaded == ("memory", adapter_hash(tiny_adapter))
    again = texts(engine.generate(prompts, greedy, Weights(tiny_model), seed=0))
    assert id(engine.llm) == llm_before  # same engine object: weights were reloaded in place
    assert all(row[0].startswith(TARGET[:10]) for row in tuned), tuned[:2]
    assert not any(row[0].startswith(TARGET[:10]) for row in base)
    assert again == base  # switching back to the base restores its outputs exactly


LORA_SCRIPT = """
import json, sys
from selfimprove.engines.vllm_engine import VLLMEngine
from selfimprove.engines.vllm_engine import lora_id
from selfimprove.records import SamplingConfig, Weights, adapter_hash
from selfimprove.tasks.arithmetic import Arithmetic
if __name__ == "__main__":
    model, adapter = sys.argv[1], sys.argv[2]
    task = Arithmetic(Arithmetic.Config(num_train=40, num_test=12, prompt_format="chat"))
    eng = VLLMEngine(VLLMEngine.Config(in_process=True, adapter_mode="lora", max_model_len=1024), model)
    prompts = [task.prompt(p) for p in task.problems("test")]
    out = eng.generate(prompts, SamplingConfig(max_tokens=10), Weights.of(model, adapter, "tuned"), seed=0)
    base = eng.generate(prompts, SamplingConfig(max_tokens=10), Weights(model), seed=0)
    # Retrained in place: adapter B (A with its B matrices zeroed, so it acts as the base) over A's folder.
    from safetensors.torch import load_file, save_file
    file = adapter + "/adapter_model.safetensors"
    save_file({k: v * 0 if "lora_B" in k else v for k, v in load_file(file).items()}, file)
    over = eng.generate(prompts, SamplingConfig(max_tokens=10), Weights.of(model, adapter, "tuned"), seed=0)
    print("RESULT" + json.dumps({"tuned": [r[0].text for r in out], "base": [r[0].text for r in base],
                                 "overwritten": [r[0].text for r in over]}))
"""


def test_per_request_lora_path(tiny_model, tiny_adapter, tmp_path):
    """adapter_mode=lora (the GPU default) serves the adapter per request; it needs its own engine (enable_lora),
    so it runs in a subprocess."""
    adapter = shutil.copytree(tiny_adapter, tmp_path / "adapter")  # the script overwrites it
    result = run_script(tmp_path, "lora.py", LORA_SCRIPT, tiny_model, str(adapter))
    assert all(t.startswith(TARGET[:10]) for t in result["tuned"]), result["tuned"][:2]
    assert not any(t.startswith(TARGET[:10]) for t in result["base"])
    assert result["overwritten"] == result["base"]  # the new adapter in the old folder, not vLLM's cached one


def test_lora_id_follows_content_not_folder(tmp_path):
    def adapter(folder, content: bytes):
        folder.mkdir(exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(content)
        return Weights.of("base", str(folder))

    ids: dict[str, int] = {}
    first = lora_id(ids, adapter(tmp_path / "a", b"A"))
    assert lora_id(ids, adapter(tmp_path / "a", b"A")) == first  # unchanged: the loaded adapter is reused
    retrained = lora_id(ids, adapter(tmp_path / "a", b"B"))  # same folder, new content
    assert retrained != first
    assert lora_id(ids, adapter(tmp_path / "copy", b"A")) == first  # same content elsewhere
    assert lora_id(ids, adapter(tmp_path / "a", b"B")) == retrained


def test_hf_engine_agrees_on_adapter(tiny_model, tiny_adapter):
    from selfimprove.engines.hf_engine import HFEngine

    eng = HFEngine(HFEngine.Config(batch_size=4), tiny_model)
    task = Arithmetic(Arithmetic.Config(num_train=40, num_test=12, prompt_format="chat"))
    prompts = [task.prompt(p) for p in task.problems("test")[:4]]
    tuned = eng.generate(prompts, SamplingConfig(max_tokens=10), Weights(tiny_model, tiny_adapter, "t"), seed=0)
    base = eng.generate(prompts, SamplingConfig(max_tokens=10), Weights(tiny_model), seed=0)
    assert all(r[0].text.startswith(TARGET[:10]) for r in tuned)
    assert not any(r[0].text.startswith(TARGET[:10]) for r in base)
    sampled = eng.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=8), Weights(tiny_model), seed=1)
    assert all(len(r) == 2 for r in sampled)
