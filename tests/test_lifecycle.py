"""Run lifecycle with real processes: one writer per run directory, and nothing a run started outlives it.

Every process these tests start is killed in a `finally`, so a failing test leaves no sleeping python behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from selfimprove.config import ConfigError
from selfimprove.lifecycle import (PROCESS_FILE, RUN_TOKEN, RunLock, RunLocked, kill_stale_processes,
                                   reap_children_on_exit)

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SLEEPER = "import time; time.sleep(60)"


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=ENV, **kwargs)


def _gone(pid: int, create_time: float | None = None) -> bool:
    """Dead, or a zombie nobody reaps (PID 1 in a container may not): either way it holds nothing."""
    try:
        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE or (create_time is not None and proc.create_time() != create_time)
    except psutil.NoSuchProcess:
        return True


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def _record(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / PROCESS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _kill(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):
            pass


# -- RunLock -----------------------------------------------------------------------------------------------------

def test_second_holder_is_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(RunLocked) as err:
            RunLock(tmp_path / "run").acquire()
        assert f"pid {os.getpid()}" in str(err.value) and "--run-dir" in str(err.value)
        assert isinstance(err.value, ConfigError)  # the CLI prints it as one line, exit code 2
    with RunLock(tmp_path / "run"):  # released on exit
        pass


HOLD_LOCK = """
import sys, time
from selfimprove.lifecycle import RunLock
lock = RunLock(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_of_a_sigkilled_run_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = _python(HOLD_LOCK, str(run_dir), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid} "):
            RunLock(run_dir).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        started = time.monotonic()
        with RunLock(run_dir) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert time.monotonic() - started < 2
    finally:
        _kill(holder.pid)
        holder.wait()


FORK_HOLDER = """
import os, sys, time
from selfimprove.lifecycle import RunLock, reap_children_on_exit
reap_children_on_exit(sys.argv[1], interval_s=0.1)
RunLock(sys.argv[1]).__enter__()
child = os.fork()
if child == 0:  # like a forked engine worker: inherits the locked descriptor
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_lock_held_by_a_leftover_fork_is_taken_over(tmp_path):
    """The run and its watchdog are both SIGKILLed; a forked child still holds the lock. The next run sees the
    owner is dead, kills the child from the record, and gets the lock."""
    run_dir = tmp_path / "run"
    holder = _python(FORK_HOLDER, str(run_dir), stdout=subprocess.PIPE, text=True)
    child = watchdog = None
    try:
        child = int(holder.stdout.readline())
        _wait_for(lambda: str(child) in _record(run_dir).get("children", {}), 10, "the watchdog to record the fork")
        watchdog = _record(run_dir)["watchdog"]
        _kill(watchdog)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        child_time = psutil.Process(child).create_time()
        assert not _gone(child), "the fork should have outlived its run (nothing left to reap it)"
        with RunLock(run_dir) as lock:
            assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        _wait_for(lambda: _gone(child, child_time), 5, "the leftover fork to die")
    finally:
        _kill(holder.pid, child, watchdog)
        holder.wait()


# -- the reaper ----------------------------------------------------------------------------------------------------

# The run: guard installed, then a child (started without the run's token, so only the watchdog's memory of the
# process tree can find it) that starts a grandchild; both sleep.
GUARDED_RUN = """
import os, subprocess, sys, time
from selfimprove.lifecycle import RUN_TOKEN, reap_children_on_exit
reap_children_on_exit(sys.argv[1], interval_s=0.2)
env = {k: v for k, v in os.environ.items() if k != RUN_TOKEN}
child = subprocess.Popen([sys.executable, "-c", sys.argv[2]], env=env, stdout=subprocess.PIPE, text=True)
grandchild = int(child.stdout.readline())
print(child.pid, grandchild, flush=True)
time.sleep(60)
"""
SPAWNS_GRANDCHILD = f"""
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}])
print(grandchild.pid, flush=True)
time.sleep(60)
"""


def test_sigkilled_run_leaves_no_descendants(tmp_path):
    run = _python(GUARDED_RUN, str(tmp_path), SPAWNS_GRANDCHILD, stdout=subprocess.PIPE, text=True)
    pids = []
    try:
        pids = [int(p) for p in run.stdout.readline().split()]
        times = [psutil.Process(p).create_time() for p in pids]
        _wait_for(lambda: all(str(p) in _record(tmp_path).get("children", {}) for p in pids), 10,
                  "the watchdog to record both descendants")
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        _wait_for(lambda: all(_gone(p, t) for p, t in zip(pids, times)), 5, "child and grandchild to be killed")
        assert _record(tmp_path)["children"] == {}
    finally:
        _kill(run.pid, *pids)
        run.wait()


ORPHANING_RUN = f"""
import subprocess, sys, time
from selfimprove.lifecycle import reap_children_on_exit
reap_children_on_exit(None, interval_s=1.0)
# A child that starts a grandchild and exits at once: the grandchild is reparented straight away.
out = subprocess.run([sys.executable, "-c",
                      "import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], "
                      "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],
                     capture_output=True, text=True).stdout
print(out.strip(), flush=True)
time.sleep(60)
"""


def test_orphaned_grandchild_is_killed_too(tmp_path):
    """A descendant reparented before the watchdog saw it in the tree still carries the run's token."""
    run = _python(ORPHANING_RUN, stdout=subprocess.PIPE, text=True)
    orphan = None
    try:
        orphan = int(run.stdout.readline())
        orphan_time = psutil.Process(orphan).create_time()
        assert psutil.Process(orphan).ppid() != run.pid
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        _wait_for(lambda: _gone(orphan, orphan_time), 6, "the orphaned grandchild to be killed")
    finally:
        _kill(run.pid, orphan)
        run.wait()


FINISHED_RUN = """
import subprocess, sys, time
from selfimprove.lifecycle import reap_children_on_exit
reap_children_on_exit(sys.argv[1], interval_s=0.1)
grandchild = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(0.5)'])"
child = subprocess.Popen([sys.executable, "-c", grandchild])
child.wait()
time.sleep(0.5)  # the watchdog has seen the children come and go
print(open(sys.argv[1] + "/processes.json").read().replace(chr(10), " "), flush=True)
"""


def test_normal_exit_kills_nothing_and_the_watchdog_ends(tmp_path):
    bystander = _python(SLEEPER)
    watchdog = None
    try:
        run = _python(FINISHED_RUN, str(tmp_path), stdout=subprocess.PIPE, text=True)
        record = json.loads(run.stdout.readline())
        watchdog = record["watchdog"]
        assert run.wait(timeout=20) == 0
        assert record["children"] == {}  # both finished children were forgotten
        _wait_for(lambda: _gone(watchdog), 5, "the watchdog to end with its run")
        assert bystander.poll() is None
    finally:
        _kill(bystander.pid, watchdog)
        bystander.wait()


STOPPED_RUN = f"""
import subprocess, sys
from selfimprove.lifecycle import reap_children_on_exit
reaper = reap_children_on_exit(None, interval_s=0.1)
child = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}])
reaper.stop()
print(child.pid, flush=True)
"""


def test_stop_ends_the_watch_without_killing(tmp_path):
    """After `stop()` the run is over by its own account: a child it still has is the caller's business."""
    run = _python(STOPPED_RUN, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(run.stdout.readline())
        assert run.wait(timeout=20) == 0
        time.sleep(1.5)
        assert not _gone(child)
    finally:
        _kill(child)
        run.wait()


def test_token_is_set_while_guarded_and_restored_after():
    assert RUN_TOKEN not in os.environ
    with reap_children_on_exit(None, interval_s=0.1) as reaper:
        assert os.environ[RUN_TOKEN]
        watchdog = reaper.watchdog.pid
    assert RUN_TOKEN not in os.environ
    assert _gone(watchdog)


# -- stale processes of an earlier run -----------------------------------------------------------------------------

def _orphan() -> int:
    """A sleeping process that is not our descendant (its parent exits at once), as a dead run leaves them."""
    starter = (f"import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], "
               f"stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
    return int(subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, check=True).stdout)


def test_kill_stale_processes_checks_create_time(tmp_path):
    """Only a recorded pid that is still the same process is killed; a pid reused by another is spared."""
    victim = bystander = None
    try:
        victim, bystander = _orphan(), _orphan()
        victim_time = psutil.Process(victim).create_time()
        (tmp_path / PROCESS_FILE).write_text(json.dumps({
            "pid": 999_999_999, "create_time": 1.0, "token": None,  # the earlier run: gone
            "children": {str(victim): victim_time, str(bystander): psutil.Process(bystander).create_time() - 100},
        }))
        assert kill_stale_processes(tmp_path) == [victim]
        _wait_for(lambda: _gone(victim, victim_time), 5, "the recorded process to die")
        assert not _gone(bystander)
    finally:
        _kill(victim, bystander)


def test_kill_stale_processes_spares_a_live_run(tmp_path):
    child = _python(SLEEPER)
    try:
        me = psutil.Process()
        (tmp_path / PROCESS_FILE).write_text(json.dumps({
            "pid": me.pid, "create_time": me.create_time(), "token": None,
            "children": {str(child.pid): psutil.Process(child.pid).create_time()},
        }))
        assert kill_stale_processes(tmp_path) == []
        assert child.poll() is None
    finally:
        _kill(child.pid)
        child.wait()
