"""One writer per run directory, and no engine process outliving its run.

- `RunLock` refuses a second `selfimprove run` on a run directory at once (two writers would interleave chunk
  files and manifests). It holds `fcntl.flock` on `run.lock`, which the kernel releases however the holder dies,
  so a lock left by a killed run is never stale.
- vLLM's engine subprocesses (VLLM::EngineCore, VLLM::Worker) outlive a SIGKILLed run with their GPU memory, and
  nothing inside a SIGKILLed process runs. So `reap_children_on_exit` starts a watchdog in its own session that
  remembers the run's descendants (by pid and create time: a reused pid is never killed; those started by exec
  also carry an environment variable, which finds the ones started just before the run died) and SIGKILLs them
  once the run is gone. If even the watchdog was killed, the next run of the directory kills the leftovers
  (`kill_stale_processes`).

The watchdog (`python -m selfimprove.lifecycle`) imports only this module, the config module and psutil; so does
the supervisor each local vLLM server runs under (`--supervise`, see serve.py), which stops its server gracefully
when the launcher is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from .config import ConfigError

LOCK_FILE = "run.lock"
PROCESS_FILE = "processes.json"  # the watchdog's record of the run's descendants
RUN_TOKEN = "SELFIMPROVE_RUN_TOKEN"  # inherited by every process a guarded run starts


class RunLocked(ConfigError):
    """Another run is writing the run directory (printed by the CLI as a config error, without a traceback)."""


class RunLock:
    """Exclusive use of a run directory for as long as the `with` block runs.

    The lock file holds the owner's pid, host, start time and command, which the refusal quotes. It is never
    deleted: removing a flock'ed file lets a second run lock a new file of the same name while the first still
    holds the old one.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _flock(fd):
                owner = _json_dict(lambda: os.pread(fd, 1 << 16, 0))
                # An owner on another machine sharing the directory counts as alive: we cannot tell.
                if (not owner or owner.get("host") != socket.gethostname()
                        or _process(owner.get("pid"), owner.get("create_time")) is not None):
                    raise RunLocked(_refusal(self.run_dir, owner))
                # The run that locked it is gone, so what holds the lock is a process that inherited the
                # descriptor from it (a forked engine worker): a leftover, and killing leftovers is our job.
                kill_stale_processes(self.run_dir)
                if not _flock(fd, wait_s=3.0):
                    raise RunLocked(f"{self.run_dir}: the run that locked it (pid {owner.get('pid')}) has "
                                    f"ended, but a process it started still holds {self.path}; find it with "
                                    f"`fuser -v {self.path}` and stop it, then run again")
            me = psutil.Process()
            identity = {"pid": me.pid, "create_time": me.create_time(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(identity, indent=1).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # still held here: an empty file means nobody is writing the directory
        finally:
            os.close(fd)  # closing the last descriptor releases the flock


def _flock(fd: int, wait_s: float = 0.0) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def _refusal(run_dir: Path, owner: dict | None) -> str:
    if not owner:  # locked, but the owner has not written its identity yet (it has just started)
        return (f"{run_dir}: another run has just started writing this run directory; wait for it to finish, or "
                f"give this run another directory (--run-dir, or name=...)")
    pid = owner.get("pid")
    return (f"{run_dir}: another run is writing this run directory: pid {pid} on {owner.get('host')}, started "
            f"{owner.get('started')} ({owner.get('command')}). Wait for it to finish, stop it (kill {pid}), or give "
            f"this run another directory (--run-dir, or name=...)")


def _process(pid, create_time) -> psutil.Process | None:
    """The live (not zombie) process with this pid and create time, or None: a pid alone may have been reused."""
    if not isinstance(pid, int) or not isinstance(create_time, (int, float)):
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def _json_dict(read) -> dict | None:
    """The JSON object `read()` returns the text of; None for anything else (empty, cut, unreadable)."""
    try:
        data = json.loads(read() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- engine processes never outlive the run ----------------------------------------------------------------------

class ChildReaper(contextlib.AbstractContextManager):
    """Until `stop()`, a watchdog kills this process's descendants if this process dies (SIGKILL included).
    Use it as `with reap_children_on_exit(run_dir):`.

    `stop()` (or leaving the `with` block) ends the watchdog without killing anything: the run ended normally
    and closed its engine. A process that exits without stopping it has its remaining descendants killed.
    With `run_dir`, the watchdog records the descendants in `processes.json` there, and starting first kills
    whatever an earlier run of that directory left alive (`kill_stale_processes`).
    """

    def __init__(self, run_dir: str | Path | None = None, interval_s: float = 0.5):
        token = secrets.token_hex(8)
        me = psutil.Process()
        watch = {"pid": me.pid, "create_time": me.create_time(), "token": token, "record": None,
                 "interval_s": interval_s}  # `_watch`'s arguments
        if run_dir is not None:
            kill_stale_processes(run_dir)
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            watch["record"] = str(Path(run_dir) / PROCESS_FILE)
        env = {k: v for k, v in os.environ.items() if k != RUN_TOKEN}
        package_root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        # Its own session: a Ctrl-C or a kill of the run's process group must not take the watchdog with it.
        self.watchdog: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "selfimprove.lifecycle", "--watch", json.dumps(watch)], env=env,
            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        # Set after the watchdog started, so it does not carry the token it hunts for.
        self._token_before = os.environ.get(RUN_TOKEN)
        os.environ[RUN_TOKEN] = token

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.watchdog is None:
            return
        watchdog, self.watchdog = self.watchdog, None
        if self._token_before is None:
            os.environ.pop(RUN_TOKEN, None)
        else:
            os.environ[RUN_TOKEN] = self._token_before
        _terminate(watchdog, grace_s=5)  # SIGTERM: exit without killing


reap_children_on_exit = ChildReaper


def kill_stale_processes(run_dir: str | Path) -> list[int]:
    """Kill the processes an earlier, now dead, run of `run_dir` started and left alive; return their pids.

    Nothing is killed while the recorded run is alive (it may be this very process, or a run that finished and
    went on with other work), nor this process, its ancestors or its descendants, nor any process whose create
    time differs from the recorded one (its pid was reused).
    """
    record = _json_dict((Path(run_dir) / PROCESS_FILE).read_text)
    if not record or _process(record.get("pid"), record.get("create_time")) is not None:
        return []
    # "killing": what a watchdog was killing when it died itself
    remembered = {int(pid): ct for key in ("children", "killing") if isinstance(record.get(key), dict)
                  for pid, ct in record[key].items()}
    me = psutil.Process()
    family = {me.pid} | {p.pid for p in me.parents()}
    with contextlib.suppress(psutil.Error):
        family |= {p.pid for p in me.children(recursive=True)}
    return _kill_all(remembered, record.get("token"), spare=family)


def _kill_all(remembered: dict[int, float], token: str | None, spare: set[int],
              before_kill=None) -> list[int]:
    """SIGKILL the remembered processes that are still the same processes, their descendants, and every process
    carrying `token` in its environment; repeated while a pass finds new ones (a child forked meanwhile).
    `before_kill({pid: create_time})` runs before each pass's signals are sent."""
    killed: set[int] = set()
    for _ in range(3):
        targets = {pid: proc for pid, create_time in remembered.items()
                   if (proc := _process(pid, create_time)) is not None}
        if token:
            for proc in psutil.process_iter():
                with contextlib.suppress(psutil.Error):  # another user's process, or gone
                    if proc.pid not in targets and proc.pid not in spare and proc.environ().get(RUN_TOKEN) == token:
                        targets[proc.pid] = proc
        for proc in list(targets.values()):
            with contextlib.suppress(psutil.Error):
                targets.update({child.pid: child for child in proc.children(recursive=True)})
        fresh = [proc for pid, proc in targets.items() if pid not in spare and pid not in killed]
        if not fresh:
            break
        if before_kill is not None:
            times = {}
            for proc in fresh:
                with contextlib.suppress(psutil.Error):
                    times[proc.pid] = proc.create_time()
            before_kill(times)
        for proc in fresh:
            with contextlib.suppress(psutil.Error):
                proc.kill()  # psutil refuses if the pid now belongs to another process
                killed.add(proc.pid)
    return sorted(killed)


# -- the watchdog process -----------------------------------------------------------------------------------------

def _watch(pid: int, create_time: float, token: str, record: str | Path | None, interval_s: float) -> list[int]:
    """Remember `pid`'s descendants until it is gone, then kill those still alive; a SIGTERM ends the watch
    without killing. Returns the pids killed."""
    record = Path(record) if record else None
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop() raises KeyboardInterrupt; SIGINT is ignored
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    remembered: dict[int, float] = {}
    me = os.getpid()
    memory = MemoryLog(record.parent / MEMORY_FILE) if record is not None else None
    _write_record(record, pid, create_time, token, remembered)  # at once: the token is on record before any descendant
    try:
        while (parent := _process(pid, create_time)) is not None:
            before = dict(remembered)
            try:
                current = {p.pid: p for p in parent.children(recursive=True) if p.pid != me}
            except psutil.Error:
                current = {}
            remembered.update({p: child.create_time() for p, child in current.items()})  # children() cached them
            # Forget the ones that ended; keep the ones that are only reparented (their parent exited).
            remembered = {p: t for p, t in remembered.items() if p in current or _process(p, t) is not None}
            if remembered != before:
                _write_record(record, pid, create_time, token, remembered)
            if memory is not None:
                memory.sample([parent, *current.values()])
            time.sleep(interval_s)
    except KeyboardInterrupt:  # SIGTERM
        return []
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # from here on, finish the job
    killing: dict[int, float] = {}

    def move_to_killing(procs: dict[int, float]) -> None:
        # The record's `children` are the run's descendants still alive. Each pass moves its targets from there
        # to `killing` before signalling them, so `children` never lists a process already dead, and a watchdog
        # killed mid-way still leaves every target on record for `kill_stale_processes`.
        killing.update(procs)
        _write_record(record, pid, create_time, token, {}, killing)

    killed = _kill_all(remembered, token, spare={me}, before_kill=move_to_killing)
    if killed:
        print(f"selfimprove: run pid {pid} ended; killed {len(killed)} process(es) it left: "
              f"{', '.join(map(str, killed))}", file=sys.stderr)
    _write_record(record, pid, create_time, token, {})
    return killed


MEMORY_FILE = "memory.tsv"  # the watchdog's samples of the run's memory, summed over its processes


class MemoryLog:
    """Resident memory of the run and all its processes together (the engine's subprocesses included, which the
    main process's peak RSS does not see), appended as `unix time <tab> MiB` when it moves by 1% or every 10 s."""

    def __init__(self, path: Path):
        self.path, self.last, self.last_time = path, 0.0, 0.0

    def sample(self, processes: list) -> None:
        total = 0
        for proc in processes:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        mib, now = total / 2**20, time.time()
        if abs(mib - self.last) > 0.01 * self.last or now - self.last_time > 10:
            try:
                with open(self.path, "a") as f:
                    f.write(f"{now:.2f}\t{mib:.1f}\n")
            except OSError:
                return
            self.last, self.last_time = mib, now


def give_back_freed_memory() -> None:
    """Return memory freed by a finished stage to the operating system. glibc's allocator keeps freed heap pages
    (a training's activations and optimizer state) resident for reuse: after an SFT stage of the main job the run's
    process stayed at ~4 GiB though the trainer was gone; `malloc_trim` gives it back (2.6 -> 0.6 GiB after a short
    SFT, benchmarks/README.md P6). Elsewhere (another libc, macOS) only the garbage collection runs."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mib(run_dir: str | Path, since: float, until: float) -> float | None:
    """The highest summed memory the watchdog saw between two times (None when it recorded none)."""
    path = Path(run_dir) / MEMORY_FILE
    if not path.exists():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            stamp, mib = map(float, line.split("\t"))
        except ValueError:  # a line cut by a kill
            continue
        if since <= stamp <= until:
            values.append(mib)
    return max(values, default=None)


def _write_record(path: Path | None, pid: int, create_time: float, token: str, children: dict[int, float],
                  killing: dict[int, float] | None = None) -> None:
    """Atomically, so that `kill_stale_processes` never reads half a record (none without a path)."""
    if path is None:
        return
    data = {"pid": pid, "create_time": create_time, "token": token, "watchdog": os.getpid(),
            "children": {str(p): t for p, t in sorted(children.items())}}
    if killing:
        data["killing"] = {str(p): t for p, t in sorted(killing.items())}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # a stop() waits until the record is whole
    try:
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:  # the run directory was removed: the watch goes on, unrecorded
        tmp.unlink(missing_ok=True)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def signal_group(pgid: int, sig: int) -> None:
    """Signal a process group; one already gone is no error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# -- the supervisor of one server (serve.py): `python -m selfimprove.lifecycle --supervise PARENT_PID -- CMD...` --

STOP_GRACE_S = 20.0  # a vLLM server shuts its engine down in a few seconds on SIGTERM


def _supervise(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[argv.index("--") + 1:]
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.append(True))
    if os.getppid() != parent:  # the launcher died before we got here
        return 1
    child = subprocess.Popen(cmd)  # same process group: vLLM's processes all land in it
    while child.poll() is None and not stop and os.getppid() == parent:
        time.sleep(0.25)
    _terminate(child, STOP_GRACE_S)
    _stop_rest_of_group()
    return child.returncode  # set: the child was waited for


def _terminate(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `grace_s`; returns once it has exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _stop_rest_of_group() -> None:
    """Stop every other process in this process group: what the server left (its EngineCore, Worker, ... when it
    died without stopping them). SIGTERM, then SIGKILL after a grace period. multiprocessing's resource tracker
    goes last, and is killed only if it does not exit by itself once the others are gone: it is what unlinks the
    shared memory they leave (vLLM's message queues, about 400 MB per server in /dev/shm), which a killed
    tracker leaks."""
    me, group = os.getpid(), os.getpgrp()

    def rest() -> list:
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid != me and os.getpgid(proc.pid) == group:
                    found.append(proc)
        return found

    def tracker(proc) -> bool:
        try:
            return "resource_tracker" in " ".join(proc.cmdline())
        except psutil.Error:
            return False

    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        procs = [p for p in rest() if not tracker(p)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        psutil.wait_procs(procs, timeout=grace_s)
    psutil.wait_procs(rest(), timeout=10.0)  # trackers exit when the last process using them is gone
    for proc in rest():
        with contextlib.suppress(psutil.Error):
            proc.kill()


if __name__ == "__main__":  # `--watch ARGUMENTS_JSON` (ChildReaper) or `--supervise ...` (serve.py)
    if sys.argv[1] == "--watch":
        _watch(**json.loads(sys.argv[2]))
    else:
        sys.exit(_supervise(sys.argv[2:]))
