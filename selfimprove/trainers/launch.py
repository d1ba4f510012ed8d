"""Offline training (SFT, DPO, a user's trainer) under several processes: data parallel over GPUs (accelerate
launch), or over CPU processes with gloo (torchrun). Settings, the files of a launch, limits: docs/launch.md.

Why it is built this way:
- The stage and the processes meet only through files in `<work_dir>/launch/`: every process re-resolves the
  trainer from its YAML form and runs its ordinary `train(...)`, so a launched training is the in-process one
  but for the batch split (`optim.batch_size` / N per process, the global batch kept).
- The launcher runs in-process under `--start`, so that elastic's ChildFailedError is written down and the
  stage's error names the failing rank; on CPU it is torchrun, as accelerate 1.15's starts a single process there.
- Every process saves its unwrapped model's adapter (rank 0 to the stage's folder, the others to a scratch one),
  so parameter sharding (FSDP, ZeRO-3) is refused at config load: a shard cannot write the adapter.
- `run()` deletes the checkpoints no process may resume before any rank starts: concurrent deletions would race.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..artifacts import read_json, read_jsonl, write_json
from ..lifecycle import signal_group
from ..registry import TrainerSpec
from ..shipped import find
from .common import resume_point

SPEC = "spec.json"
ROWS = "rows.jsonl"
RESULT = "result.json"
FAILURES = "failures.json"
LAUNCH_KEY = "launch_key"  # in the trainer work folder: which launch wrote its checkpoints
TAIL_LINES = 40  # of the processes' output, quoted in a failure's message

# accelerate's DistributedType values this launcher starts (its config_args turns the file's string into these).
REPLICATED = {"MULTI_GPU", "MULTI_CPU", "DEEPSPEED"}  # DEEPSPEED: ZeRO stages 0-2 only (checked below)
# DeepSpeed multi-node launchers that start the other machines' processes from this one (accelerate's
# DEEPSPEED_MULTINODE_LAUNCHERS minus those that expect a command run on every machine).
REMOTE_STARTING = {"pdsh", "openmpi", "mvapich", "mpich"}

class LaunchFailed(RuntimeError):
    """A launched training did not finish: a process failed, was killed, or reported nothing."""


@dataclass
class Launch:
    """How the train stage runs its trainer: in its own process (`num_processes: 1`), or under a launcher with
    `config`, an accelerate config file (None: plain DDP). The file is read with accelerate's own loader when the
    pipeline's config loads, so an unknown key or distributed type is refused before any model loads."""

    config: str | None = None
    num_processes: int = 1

    def __post_init__(self):
        if self.num_processes < 1:
            raise ValueError(f"launch.num_processes must be >= 1 (1: train in the stage's own process), "
                             f"got {self.num_processes}")
        if self.config is not None and self.num_processes > 1:
            self.accelerate_config()  # validates

    def accelerate_config(self) -> dict | None:
        """The accelerate config file as a dict (after accelerate's own parsing and defaults), or None without
        one. Raises ValueError naming the key and the fix for what this launcher cannot run."""
        if self.config is None:
            return None
        path = find(self.config)
        where = f"launch.config: {path}"
        if not path.is_file():
            raise ValueError(f"launch.config: no file {str(path)!r} (relative to {os.getcwd()}); the shipped ones "
                             f"are configs/accelerate/ddp.yaml, fsdp.yaml, deepspeed_zero2.yaml, deepspeed_zero3.yaml")
        from accelerate.commands.config.config_args import load_config_from_file

        try:
            config = load_config_from_file(str(path)).to_dict()
        except (ValueError, TypeError, KeyError) as err:  # unknown keys, an unknown distributed_type, bad YAML shape
            raise ValueError(f"{where} is not an accelerate config accelerate can read: {err}") from err
        kind, ds = str(config.get("distributed_type")), config.get("deepspeed_config") or {}
        zero_stage = int(ds.get("zero_stage", 2))  # accelerate's default stage, unless a DeepSpeed file sets it
        if kind == "DEEPSPEED" and ds.get("deepspeed_config_file"):
            file = Path(ds["deepspeed_config_file"])
            try:
                zero_stage = int(json.loads(file.read_text()).get("zero_optimization", {}).get("stage", 0))
            except (OSError, ValueError) as err:
                raise ValueError(f"{where}: deepspeed_config_file {file}: {err}") from err
        if kind == "FSDP" or (kind == "DEEPSPEED" and zero_stage == 3):
            raise ValueError(
                f"{where}: distributed_type {kind}{' (ZeRO-3)' if kind == 'DEEPSPEED' else ''} shards the "
                f"parameters across processes, and the trainers save their adapter from the unwrapped model of each "
                f"process (trainers/common.save_adapter), which would then hold only one shard. Use "
                f"configs/accelerate/ddp.yaml or deepspeed_zero2.yaml (parameters replicated, optimizer state "
                f"sharded by ZeRO-2) until saving gathers the sharded state dict")
        if kind not in REPLICATED:
            raise ValueError(f"{where}: distributed_type {kind} is not one this launcher runs: use MULTI_GPU (DDP) "
                             f"or DEEPSPEED (ZeRO stage <= 2)" + ("; NO starts a single process" * (kind == "NO")))
        if config.get("compute_environment", "LOCAL_MACHINE") != "LOCAL_MACHINE":
            raise ValueError(f"{where}: compute_environment must be LOCAL_MACHINE, got {config['compute_environment']}")
        if int(config.get("machine_rank") or 0) != 0:
            raise ValueError(f"{where}: machine_rank must be 0: the train stage launches from the machine the "
                             f"pipeline runs on")
        machines = int(config.get("num_machines") or 1)
        if machines > 1:
            launcher, hostfile = ds.get("deepspeed_multinode_launcher"), ds.get("deepspeed_hostfile")
            if kind != "DEEPSPEED" or launcher not in REMOTE_STARTING:
                raise ValueError(
                    f"{where}: num_machines {machines} needs a launcher that starts the other machines' processes "
                    f"from this one, since the train stage runs on one machine: DeepSpeed with deepspeed_config."
                    f"deepspeed_multinode_launcher one of {sorted(REMOTE_STARTING)} and a deepspeed_hostfile (got "
                    f"distributed_type {kind}, launcher {launcher})")
            if not hostfile or not Path(hostfile).is_file():
                raise ValueError(f"{where}: num_machines {machines} needs deepspeed_config.deepspeed_hostfile, a "
                                 f"file naming the machines (\"host slots=N\" a line); got {hostfile!r}")
            if self.num_processes % machines:
                raise ValueError(f"launch.num_processes {self.num_processes} is not a multiple of the config's "
                                 f"num_machines {machines}: it counts processes over all machines")
        return config


def check_batch(trainer: TrainerSpec, launch: Launch) -> None:
    """Config-load check that `trainer` can run under `launch` with its global batch kept (docs/launch.md)."""
    n = launch.num_processes
    if n == 1:
        return
    batch = getattr(getattr(trainer.config, "optim", None), "batch_size", None)
    if not isinstance(batch, int):
        raise ValueError(f"launch.num_processes {n}: trainer {trainer.name!r} has no `optim.batch_size` (the global "
                         f"batch the launcher splits over the processes), so it cannot keep its batch under "
                         f"several processes; set launch.num_processes: 1")
    if batch % n:
        fits = [k for k in range(2, batch + 1) if batch % k == 0]
        raise ValueError(
            f"launch.num_processes {n} does not divide trainer.optim.batch_size {batch}: the global batch is split "
            f"evenly, batch_size / num_processes per process. Use a batch_size that is a multiple of {n} "
            f"(e.g. {n * max(1, round(batch / n))}), or num_processes in {fits or '(none: batch_size is 1)'}")


def run(launch: Launch, trainer: TrainerSpec, rows: list[dict], base_path: str, init_adapter: str | None,
        adapter_out: Path, work_dir: Path, seed: int, round_index: int, policy_adapter: str | None,
        log_file: Path, label: str) -> dict:
    """Train `trainer` on `rows` under `launch.num_processes` processes (1: in this process), exactly as
    `trainer.build().train(...)` with these arguments would here, and return rank 0's metrics. `label` names the
    stage in errors."""
    work_dir, adapter_out, log_file = Path(work_dir), Path(adapter_out), Path(log_file)
    n = launch.num_processes
    if n == 1:  # in this process: the checkpoints it writes are no launch's, so a later launch must not resume them
        (work_dir / LAUNCH_KEY).unlink(missing_ok=True)
        return trainer.build().train(rows, base_path, init_adapter, adapter_out, work_dir, seed=seed,
                                     round_index=round_index, policy_adapter=policy_adapter)
    check_batch(trainer, launch)
    config = launch.accelerate_config()
    folder = work_dir / "launch"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / ROWS).write_text("".join(json.dumps(row) + "\n" for row in rows))
    optim = trainer.config.optim  # each process gets its share of the global batch
    each = TrainerSpec(trainer.name, trainer.target, replace(trainer.config, optim=replace(
        optim, batch_size=optim.batch_size // n)))
    spec = {"trainer": each.as_config(), "global_batch_size": optim.batch_size,
            "num_processes": n, "base_path": base_path, "init_adapter": init_adapter,
            "policy_adapter": policy_adapter, "adapter_out": str(adapter_out.resolve()), "seed": seed,
            "round_index": round_index, "config": config}
    write_json(folder / SPEC, spec)
    command, env = worker_command(launch, config, work_dir, folder)  # first: a refused launch deletes nothing
    # Delete the checkpoints no process may resume (a checkpoint's meaning depends on the rows and on the spec but
    # where the adapter goes), while no process runs.
    resume_point(work_dir, {"spec": {k: v for k, v in spec.items() if k != "adapter_out"}, "rows": rows},
                 key_name=LAUNCH_KEY)
    started = time.time()
    code, tail = _stream(command, env, log_file)
    result = read_or_none(folder / RESULT)
    if code != 0 or result is None:
        raise LaunchFailed(failure(label, n, command, code, read_or_none(folder / FAILURES), tail, log_file))
    return {**result["metrics"], "processes": n, "launch_seconds": round(time.time() - started, 1)}


def worker_command(launch: Launch, config: dict | None, work_dir: Path, folder: Path,
                   module: str = "selfimprove.trainers.launch") -> tuple[list[str], dict]:
    import torch

    n, config, env = launch.num_processes, config or {}, dict(os.environ)
    worker = ["-m", module, str(work_dir.resolve())]  # what each process runs (rl_launch.py: the rl stage's)
    start = [sys.executable, "-m", "selfimprove.trainers.launch", "--start"]
    if torch.cuda.is_available():
        if config.get("distributed_type") == "MULTI_CPU":
            raise LaunchFailed(f"launch.config {launch.config}: distributed_type MULTI_CPU on a machine with CUDA: "
                               f"accelerate's launcher starts a single process from it; use "
                               f"configs/accelerate/ddp.yaml")
        if launch.config is None:
            config_file = folder / "accelerate_ddp.yaml"
            config_file.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                                   "num_machines: 1\nmachine_rank: 0\ngpu_ids: all\nmixed_precision: 'no'\n")
        else:
            config_file = find(launch.config).resolve()
        command = [*start, "accelerate", "--config_file", str(config_file), "--num_processes", str(n)]
        if int(config.get("num_machines") or 1) == 1 and not config.get("main_process_port"):
            command += ["--main_process_port", "0"]  # a free port: two runs on one machine must not collide
        return command + worker, env
    kind = str(config.get("distributed_type", "MULTI_GPU"))
    if kind not in ("MULTI_GPU", "MULTI_CPU") or int(config.get("num_machines") or 1) > 1:
        raise LaunchFailed(f"launch.config {launch.config} asks for {kind} on {config.get('num_machines')} "
                           f"machine(s), which needs GPUs; without CUDA the launcher runs DDP over gloo on this "
                           f"machine's CPUs (configs/accelerate/ddp.yaml or no config)")
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // n)))
    return [*start, "torchrun", "--standalone", "--nproc_per_node", str(n)] + worker, env


def _stream(command: list[str], env: dict, log_file: Path) -> tuple[int, list[str]]:
    """Run `command`, appending its output to `log_file` as it comes; (exit code, its last lines). The launcher
    runs in a process group of its own, which an interrupted stage kills whole, its training processes too."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with open(log_file, "a", buffering=1) as log:  # line-buffered: each line reaches the file as it comes
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(command)}\n")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                   errors="replace", start_new_session=True)
        try:
            for line in process.stdout:  # text mode: a progress bar's \r ends a line too
                log.write(line)
                if line.strip():
                    tail.append(line.rstrip("\n"))
            return process.wait(), list(tail)
        except BaseException:
            for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                signal_group(process.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(wait_s)
                    break
            raise


def read_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# The launcher stops the others with SIGTERM: a SIGKILL came from elsewhere, on a CPU most often the kernel's OOM killer
# (each process holds its own activations, so N processes need about N times one process's memory for them).
SIGNALLED = {"SIGKILL": "killed by SIGKILL (not the launcher's signal, which is SIGTERM): if nothing else killed it, "
                        "the kernel's out-of-memory killer (`dmesg | grep -i 'out of memory'`); a smaller trainer "
                        "micro_batch_size or fewer processes need less memory",
             "SIGTERM": "stopped by SIGTERM (by the launcher after another process failed, or killed)"}


def failure(label: str, n: int, command: list[str], code: int, failures: dict | None, tail: list[str],
            log_file: Path) -> str:
    launcher = "accelerate launch" if "accelerate" in command else "torchrun"
    lines = [f"{label}: training under {n} processes failed: {launcher} exited with code {code}."]
    for rank, failure in sorted((failures or {}).items(), key=lambda item: int(item[0])):
        seen = f"exit code {failure['exitcode']}" + (f": {failure['signal']}" if failure["signal"] else "")
        what = failure["error"] or (SIGNALLED.get(failure["signal"], f"stopped by {failure['signal']}")
                                    if failure["signal"] else "recorded no error")
        lines.append(f"  rank {rank} ({seen}): {what}")
    if failures is None:
        lines.append("  no process failure was recorded" + (" (every process finished, but rank 0 wrote no result)"
                                                           if code == 0 else " (the launcher itself failed)"))
    lines.append(f"Full log: {log_file}. Its last lines:")
    return "\n".join(lines + [f"  | {line}" for line in tail])


def _start(argv: list[str]) -> int:
    """`--start torchrun|accelerate ARGS`: run that launcher here and record its failures (see the module doc);
    the launch's last argument is the work folder."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    kind, args = argv[0], argv[1:]
    try:
        if kind == "torchrun":
            from torch.distributed.run import parse_args, run as torchrun

            torchrun(parse_args(args))
        else:
            from accelerate.commands.launch import launch_command, launch_command_parser

            launch_command(launch_command_parser().parse_args(args))
        return 0
    except ChildFailedError as err:
        failures = {}
        for rank, failure in err.failures.items():
            recorded = failure.message if isinstance(failure.message, dict) else {}
            failures[rank] = {"exitcode": failure.exitcode, "error": recorded.get("message"),
                              "signal": failure.signal_name() if failure.exitcode < 0 else None,
                              "traceback": recorded.get("extraInfo", {}).get("py_callstack")}
        write_json(Path(args[-1]) / "launch" / FAILURES, failures)
        return 1


def _train(work_dir: Path) -> None:
    """One launched process: build the trainer from the spec and train; rank 0 writes the result."""
    folder = work_dir / "launch"
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    spec = read_json(folder / SPEC)
    if world != spec["num_processes"]:
        raise RuntimeError(f"this process was started as one of {world}, but the launch asked for "
                           f"{spec['num_processes']}: the launcher did not start the processes it was asked for")
    trainer = TrainerSpec.from_config(spec["trainer"], str(folder / SPEC), "trainer")
    rows = read_jsonl(folder / ROWS)
    # Every process saves (the module doc); only rank 0 into the stage's adapter folder.
    out = Path(spec["adapter_out"]) if rank == 0 else folder / f".rank{rank}-adapter"
    metrics = trainer.build().train(rows, spec["base_path"], spec["init_adapter"], out, work_dir,
                                    seed=spec["seed"], round_index=spec["round_index"],
                                    policy_adapter=spec["policy_adapter"])
    if rank == 0:
        write_json(folder / RESULT, {"metrics": metrics})
    else:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--start"] and len(argv) > 2:
        return _start(argv[1:])
    if len(argv) != 1:
        print("usage: python -m selfimprove.trainers.launch <work_dir>  (started by the train stage's launcher)",
              file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import record  # torch: only in a launched process

    record(_train)(Path(argv[0]))  # an exception goes to the error file the elastic agent gave this process
    return 0


if __name__ == "__main__":
    sys.exit(main())
