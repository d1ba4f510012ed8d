"""The served engine on the tiny model, with real vLLM servers on loopback.

Two servers are launched once for the module by the engine itself (`launch: 2`) and shared; the test that kills
one of them runs last. Each server start costs 30-60 s on a small CPU machine, so the tests are few and each
checks several things.
"""

import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

pytest.importorskip("vllm")
import psutil  # noqa: E402

from selfimprove.records import SamplingConfig, Weights  # noqa: E402

CHAT = [[{"role": "user", "content": f"What is {i} + {i + 1}?"}] for i in range(8)]
TEXT = ["1 2 3 4", "a b c", "The answer is", "Once upon a time"]


def texts(outputs):
    return [[c.text for c in row] for row in outputs]


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def served(tiny_model):
    from selfimprove.engines.vllm_server import VLLMServerEngine

    config = VLLMServerEngine.Config(launch=2, port=18300, enforce_eager=True, max_model_len=1024,
                                     cpu_kv_cache_gib=1, max_concurrency=4)
    eng = VLLMServerEngine(config, tiny_model)
    tree = [p for s in eng.launched.servers for p in [psutil.Process(s.process.pid), *descendants(s.process.pid)]]
    yield eng
    eng.close()
    # close() stops the servers with SIGTERM: every process they started must be gone.
    psutil.wait_procs(tree, timeout=30)
    assert not running(tree), running(tree)


@pytest.fixture(scope="module")
def random_adapter(tiny_model, tmp_path_factory) -> str:
    """A LoRA adapter whose B matrices are random (PEFT starts them at zero), so serving it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    out = tmp_path_factory.mktemp("served") / "adapter"
    model.save_pretrained(out)
    return str(out)


def test_requests_spread_over_servers_with_reproducible_seeds(served, tiny_model):
    before = dict(served.requests_per_server)
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=12)
    a = served.generate(CHAT, sampling, Weights(tiny_model), seed=11)
    spread = {url: served.requests_per_server[url] - before.get(url, 0) for url in served.urls}
    assert len(a) == len(CHAT) and all(len(row) == 3 for row in a)
    assert all(count > 0 for count in spread.values()) and sum(spread.values()) == len(CHAT), spread
    assert {c.server for row in a for c in row} == set(served.urls)
    assert all(c.num_tokens == len(c.token_ids) <= 12 and c.finish_reason in ("stop", "length")
               and c.adapter_hash is None for row in a for c in row)
    assert len({c.text for c in a[0]}) > 1  # n samples of one prompt are not copies
    # A sample depends on its seed and prompt index, not on which server drew it.
    b = served.generate(CHAT, sampling, Weights(tiny_model), seed=11)
    assert texts(a) == texts(b)
    assert texts(served.generate(CHAT, sampling, Weights(tiny_model), seed=12)) != texts(a)
    raw = served.generate(TEXT, SamplingConfig(n=2, temperature=1.0, max_tokens=30, stop=["e"]), Weights(tiny_model), 3)
    assert [len(row) for row in raw] == [2] * len(TEXT) and all("e" not in c.text for row in raw for c in row)


def test_new_weights_reach_both_servers_and_match_in_process(served, engine, tiny_model, random_adapter):
    """Merged weights are reloaded in place on every server (no restart), and then serve exactly what the
    in-process engine serves for the same merged weights: greedy texts equal, choice log-probs within 1e-4."""
    servers = {s.url: s.process.pid for s in served.launched.servers}
    base_w, tuned_w = Weights(tiny_model), Weights.of(tiny_model, random_adapter, "tuned")
    greedy = SamplingConfig(max_tokens=10)
    base = served.generate(CHAT, greedy, base_w, seed=0)
    loads = served.weight_loads
    tuned = served.generate(CHAT, greedy, tuned_w, seed=0)
    assert served.weight_loads == loads + 2  # one in-place reload per server
    assert all(c.adapter_hash == tuned_w.adapter_hash for row in tuned for c in row)
    assert texts(tuned) != texts(base)
    # Which server answers which request is up to scheduling (a fast server may take a whole small call), so each
    # server is asked on its own: both hold the new weights and serve what the in-process engine serves.
    from selfimprove.engines.vllm_server import VLLMServerEngine

    local = texts(engine.generate(CHAT, greedy, tuned_w, seed=0))
    for url in served.urls:
        alone = VLLMServerEngine(VLLMServerEngine.Config(urls=[url]), tiny_model)
        try:
            out = alone.generate(CHAT, greedy, tuned_w, seed=0)
            assert {c.server for row in out for c in row} == {url} and texts(out) == local == texts(tuned)
            assert alone.weight_loads == 0  # it already held them
        finally:
            alone.close()
    assert {s.url: s.process.pid for s in served.launched.servers} == servers and all(
        s.alive() for s in served.launched.servers)
    # Another client puts the base weights back on one server: the next call notices and reloads the adapter.
    other = served._servers[0]
    other.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": tiny_model}})
    other.post("/update_weight_version", {"new_version": "another-client"})
    assert texts(served.generate(CHAT, greedy, tuned_w, seed=0)) == texts(tuned)
    assert served.weight_loads == loads + 3
    assert texts(tuned) == texts(engine.generate(CHAT, greedy, tuned_w, seed=0))
    assert texts(served.generate(TEXT, greedy, tuned_w, 0)) == texts(engine.generate(TEXT, greedy, tuned_w, 0))
    assert texts(served.generate(CHAT, greedy, base_w, seed=0)) == texts(base) == texts(
        engine.generate(CHAT, greedy, base_w, seed=0))
    served_scores = served.choice_logprobs(CHAT[:3] + TEXT[:1], ["Yes", "No"], tuned_w)
    local_scores = engine.choice_logprobs(CHAT[:3] + TEXT[:1], ["Yes", "No"], tuned_w)
    for got, want in zip(served_scores, local_scores):
        assert got == pytest.approx(want, abs=1e-4)


def generate_killing_mid_call(eng, api_server: psutil.Process, prompts, sampling, weights):
    """`eng.generate(..., seed=5)` while a thread SIGKILLs the second server's API process mid-call: once answers
    of this call have come back (from either server) and the victim holds requests. Returns the outputs and
    the victim's in-flight count at the kill (empty if the moment never came)."""
    counts, killed = Counter(eng.requests_per_server), []

    def kill_when_busy():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            answers = sum(eng.requests_per_server[url] - counts[url] for url in eng.urls)
            if answers > 0 and eng._servers[1].inflight > 0:
                api_server.send_signal(signal.SIGKILL)
                killed.append(eng._servers[1].inflight)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    out = eng.generate(prompts, sampling, weights, seed=5)
    killer.join()
    return out, killed


def test_server_killed_mid_call(served, tiny_model):
    """SIGKILL one server's API process while a batch is in flight: its requests are retried on the other
    server, and the call returns every completion exactly once, identical to an undisturbed call."""
    prompts = [f"Count: {' '.join(str(j) for j in range(i, i + 8))}" for i in range(16)]
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=160)
    undisturbed = served.generate(prompts, sampling, Weights(tiny_model), seed=5)
    victim = served.launched.servers[1]
    tree = [psutil.Process(victim.process.pid), *descendants(victim.process.pid)]
    api_server = psutil.Process(victim.process.pid).children()[0]
    retried = served.retried
    out, killed = generate_killing_mid_call(served, api_server, prompts, sampling, Weights(tiny_model))
    assert killed and served.retried > retried, (killed, served.retried, retried)  # killed with requests in flight
    assert not served._servers[1].alive
    assert [len(row) for row in out] == [2] * len(prompts)
    assert texts(out) == texts(undisturbed)
    # Its supervisor noticed and stopped the rest of the server's processes (EngineCore, Worker, ...).
    victim.process.wait(timeout=60)
    psutil.wait_procs(tree, timeout=30)
    assert not running(tree), running(tree)


def _serve(tiny_model, log_dir, *args) -> tuple[subprocess.Popen, list[str]]:
    """A `selfimprove serve` command; its output lines (stdout and stderr) collect in the returned list."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfimprove.serve", tiny_model, "--enforce-eager", "--max-model-len", "256",
         "--cpu-kv-cache-gib", "1", "--log-dir", str(log_dir), "--start-timeout", "400", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _wait_line(lines: list[str], start: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [line for line in list(lines) if line.startswith(start)]
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no line starting {start!r} in {timeout_s}s:\n{''.join(lines)}")


def test_serve_replicas_outlive_each_other(tiny_model, tmp_path):
    """Two `selfimprove serve` commands started together on the default ports announce different ports. One
    replica of `--replicas 2` killed mid-call: the call returns what an undisturbed call returns (its requests
    moved to the survivor and counted as failover), the other replica kept serving, the dead one is restarted
    on its port and takes requests again. SIGKILLing the command (no cleanup can run in it) still takes down
    every server and vLLM's own processes, through the supervisors."""
    import httpx

    from selfimprove.engines.vllm_server import VLLMServerEngine

    pair, pair_out = _serve(tiny_model, tmp_path / "pair", "--replicas", "2")
    single, single_out = _serve(tiny_model, tmp_path / "single")
    eng = None
    try:
        urls = _wait_line(pair_out, "urls:", 420).split()[1:]
        other = _wait_line(single_out, "urls:", 420).split()[1:]
        assert len(set(urls + other)) == 3, (urls, other)
        single.send_signal(signal.SIGTERM)  # done with it: its cores go to the pair
        assert single.wait(timeout=60) == 0

        eng = VLLMServerEngine(VLLMServerEngine.Config(urls=urls, max_concurrency=4), tiny_model)
        prompts = [f"Count: {' '.join(str(j) for j in range(i, i + 8))}" for i in range(16)]
        sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=160)
        undisturbed = eng.generate(prompts, sampling, Weights(tiny_model), seed=5)
        tree = descendants(pair.pid)
        victim_port = int(urls[1].rsplit(":", 1)[1])
        api_server = next(p for p in tree if any(c.laddr.port == victim_port and c.status == psutil.CONN_LISTEN
                                                 for c in p.net_connections(kind="tcp")))
        out, killed = generate_killing_mid_call(eng, api_server, prompts, sampling, Weights(tiny_model))
        assert killed and texts(out) == texts(undisturbed)
        assert eng.failover["servers_lost"] == 1 and eng.failover["requests_moved"] >= 1, eng.failover
        assert httpx.get(urls[0] + "/health", timeout=10).status_code == 200  # the survivor kept serving
        _wait_line(pair_out, "warning: server " + urls[1] + " exited", 120)
        _wait_line(pair_out, "server " + urls[1] + " is back", 300)
        counts = Counter(eng.requests_per_server)
        again = eng.generate(prompts, sampling, Weights(tiny_model), seed=5)
        assert texts(again) == texts(undisturbed)
        assert eng.requests_per_server[urls[1]] > counts[urls[1]], "the restarted replica takes requests again"

        tree = descendants(pair.pid)
        names = " ".join(" ".join(p.cmdline()) for p in tree) + " ".join(p.name() for p in tree)
        assert "--supervise" in names and "VLLM::EngineCore" in names, names
        pair.send_signal(signal.SIGKILL)
        pair.wait(timeout=10)
        gone, alive = psutil.wait_procs(tree, timeout=60)
        assert not running(alive), running(alive)
        with pytest.raises(httpx.HTTPError):
            httpx.get(urls[0] + "/health", timeout=5)
    finally:
        if eng is not None:
            eng.close()
        for proc in (pair, single):
            if proc.poll() is None:
                proc.kill()
