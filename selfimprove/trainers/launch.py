"""Offline training (SFT, DPO, a user's trainer) under several processes: data parallel over GPUs, or over CPU
processes with gloo.

The train stage (stages/train.py) calls `run()` when its `launch:` asks for more than one process; with
`num_processes: 1` (the default) it trains in its own process and `launch.config` is not read. The two sides meet
only through files in the trainer's work folder:

    <work_dir>/launch/spec.json     the trainer as its YAML form (re-resolved in every process), the rest of
                                    `train()`'s arguments, the number of processes
    <work_dir>/launch/rows.jsonl    the training rows as JSON (kept exactly, so the trainer's resume identity
                                    sees the same rows)
    <work_dir>/launch/result.json   rank 0's metrics
    <work_dir>/launch/failures.json when processes failed: each one's rank, exit code or signal, and the exception
                                    it recorded (torch.distributed.elastic's error files)
    <stage folder>/train.log        every process's output, streamed as it comes (appended per launch)

Every process runs `python -m selfimprove.trainers.launch <work_dir>`, the trainer's ordinary `train(...)` under
torch.distributed.elastic's `record`. The launcher runs in-process under `... launch --start`, which writes the
agent's ChildFailedError to failures.json, so the stage names the failing rank. How the processes are started:
- with CUDA: `accelerate launch --config_file <launch.config> --num_processes N` (without a config: a plain
  multi-GPU DDP config written next to the spec, so that a user's default accelerate config does not silently
  change the run). On one H200, with configs/accelerate/ddp.yaml and with the generated config (one process),
  this logged the in-process training's losses exactly; several GPUs, DeepSpeed and several machines are
  untested here;
- on CPU: `torchrun --standalone --nproc_per_node N`, since accelerate 1.15's launcher starts a single process on
  a CPU machine (`--cpu --num_processes 2` gave DistributedType.NO), while under torchrun TRL's `use_cpu=True`
  gives accelerate's MULTI_CPU (DDP over gloo). Each CPU process gets OMP_NUM_THREADS = usable cores / N unless
  it is set already.
Every process checks that WORLD_SIZE is the number asked for, so a launcher that starts fewer fails loudly.

The global batch stays what the trainer's config says: each process gets `optim.batch_size` / N (grad_accum
unchanged), and the config load refuses a batch_size that N does not divide (`check_batch`). accelerate shards
each global batch across the processes in order, so with a multiple of the global batch in rows the loss curve
matches one process's within float reduction order (tests/test_launch.py). A short last batch of an epoch is
padded by accelerate with rows from the epoch's start, so that batch differs from one process's.

Only rank 0 writes the adapter (to the stage's `adapter/`) and `result.json`. Every process calls
`trainers.common.save_adapter` on its unwrapped model (not the Trainer's `save_model`); the other ranks write to
a scratch folder of their own and delete it. Under DDP and ZeRO-2 rank 0's unwrapped model is the whole adapter.

Deviations and limits:
- Parameter sharding (FSDP; DeepSpeed ZeRO-3) is refused when the config loads: `save_adapter` on a shard cannot
  write the adapter (on an H200, FSDP2 failed in PEFT's save_pretrained on DTensors). Saving needs the gathered
  state dict (`trainer.accelerator.get_state_dict`), a change in trainers/common.py; fsdp.yaml and
  deepspeed_zero3.yaml are the configs to use once it is there.
- Several machines: only through a launcher that starts the other machines' processes itself (DeepSpeed's
  `deepspeed_multinode_launcher: pdsh` with a `deepspeed_hostfile`). Every machine must see the run directory and
  selfimprove at the same paths.
- Checkpoints and resume work as in one process (rank 0 writes each checkpoint, every rank its RNG state), to the
  same adapter bit for bit (tests/test_launch.py). Before starting, `run()` deletes the checkpoints no process
  may resume: incomplete ones, and all when the spec (trainer, rows, start, seed, process count) differs from the
  launch that wrote them or an in-process training wrote them since (`forget_launch`). It does this while no
  rank runs, since concurrent deletions would race. Two narrower races stay in trainers/common.py: each rank
  rewrites `training_key` (same content), and a rank reading it while another truncates it would drop the
  checkpoints; and rank 0 marks a checkpoint complete without waiting for the other ranks' RNG files, so a kill
  in between resumes those ranks with fresh RNG state. Both need a main-process-first step in `fit`.
- Experiment trackers (`report_to`) receive the stage's metrics, not the per-step training logs (in train.log).
- The policy-gradient trainer (trainers/rl.py) is not launched here: it runs inside the rl stage's process, one
  update between the engine's sampling steps, which would need a persistent process group.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..lifecycle import signal_group
from ..registry import TrainerSpec
from ..shipped import find
from .common import CHECKPOINT, is_complete

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
    """How the train stage runs its trainer: in its own process (`num_processes: 1`), or under a launcher.

    `config`: an accelerate config file (configs/accelerate/ddp.yaml, deepspeed_zero2.yaml, ...), a path relative
    to the directory selfimprove runs in, else a shipped one (shipped.py); None: plain DDP. `num_processes`:
    processes over all machines (GPUs with CUDA, CPU processes without). The file is read with accelerate's own
    config loader when the pipeline's config loads, so an unknown key or distributed type is refused before any
    model loads."""

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
        if not path.is_file():
            raise ValueError(f"launch.config: no file {str(path)!r} (relative to {os.getcwd()}); the shipped ones "
                             f"are configs/accelerate/ddp.yaml, fsdp.yaml, deepspeed_zero2.yaml, deepspeed_zero3.yaml")
        from accelerate.commands.config.config_args import load_config_from_file

        try:
            loaded = load_config_from_file(str(path))
        except (ValueError, TypeError, KeyError) as err:  # unknown keys, an unknown distributed_type, bad YAML shape
            raise ValueError(f"launch.config: {path} is not an accelerate config accelerate can read: {err}") from err
        config = loaded.to_dict()
        kind, ds = str(config.get("distributed_type")), config.get("deepspeed_config") or {}
        where = f"launch.config: {path}: distributed_type {kind}"
        if kind == "FSDP" or (kind == "DEEPSPEED" and _zero_stage(ds, path) == 3):
            raise ValueError(
                f"{where}{' (ZeRO-3)' if kind == 'DEEPSPEED' else ''} shards the parameters across processes, and "
                f"the trainers save their adapter from the unwrapped model of each process "
                f"(trainers/common.save_adapter), which would then hold only one shard. Use "
                f"configs/accelerate/ddp.yaml or deepspeed_zero2.yaml (parameters replicated, optimizer state "
                f"sharded by ZeRO-2) until saving gathers the sharded state dict")
        if kind not in REPLICATED:
            raise ValueError(f"{where} is not one this launcher runs: use MULTI_GPU (DDP) or DEEPSPEED (ZeRO "
                             f"stage <= 2)" + ("; NO starts a single process" if kind == "NO" else ""))
        if config.get("compute_environment", "LOCAL_MACHINE") != "LOCAL_MACHINE":
            raise ValueError(f"launch.config: {path}: compute_environment must be LOCAL_MACHINE, got "
                             f"{config['compute_environment']}")
        machines = int(config.get("num_machines") or 1)
        if int(config.get("machine_rank") or 0) != 0:
            raise ValueError(f"launch.config: {path}: machine_rank must be 0: the train stage launches from the "
                             f"machine the pipeline runs on")
        if machines > 1:
            launcher = ds.get("deepspeed_multinode_launcher")
            if kind != "DEEPSPEED" or launcher not in REMOTE_STARTING:
                raise ValueError(
                    f"launch.config: {path}: num_machines {machines} needs a launcher that starts the other "
                    f"machines' processes from this one, since the train stage runs on one machine: DeepSpeed "
                    f"with deepspeed_config.deepspeed_multinode_launcher one of {sorted(REMOTE_STARTING)} and a "
                    f"deepspeed_hostfile (got distributed_type {kind}, launcher {launcher})")
            hostfile = ds.get("deepspeed_hostfile")
            if not hostfile or not Path(hostfile).is_file():
                raise ValueError(f"launch.config: {path}: num_machines {machines} needs deepspeed_config."
                                 f"deepspeed_hostfile, a file naming the machines (\"host slots=N\" a line); got "
                                 f"{hostfile!r}")
            if self.num_processes % machines:
                raise ValueError(f"launch.num_processes {self.num_processes} is not a multiple of the config's "
                                 f"num_machines {machines}: it counts processes over all machines")
        return config


def _zero_stage(ds: dict, path: Path) -> int:
    if ds.get("deepspeed_config_file"):
        file = Path(ds["deepspeed_config_file"])
        try:
            return int(json.loads(file.read_text()).get("zero_optimization", {}).get("stage", 0))
        except (OSError, ValueError) as err:
            raise ValueError(f"launch.config: {path}: deepspeed_config_file {file}: {err}") from err
    return int(ds.get("zero_stage", 2))  # accelerate's default stage


def check_batch(trainer: TrainerSpec, launch: Launch) -> None:
    """Config-load check that `trainer` can run under `launch` with its global batch kept (see the module doc)."""
    n = launch.num_processes
    if n == 1:
        return
    optim = getattr(trainer.config, "optim", None)
    batch = getattr(optim, "batch_size", None)
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
    """Train `trainer` on `rows` under `launch.num_processes` processes, exactly as `trainer.build().train(...)`
    with these arguments would in this process, and return rank 0's metrics. `label` names the stage in errors."""
    work_dir, adapter_out, log_file = Path(work_dir), Path(adapter_out), Path(log_file)
    n = launch.num_processes
    check_batch(trainer, launch)
    config = launch.accelerate_config()
    folder = work_dir / "launch"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with open(folder / ROWS, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    optim = trainer.config.optim  # each process gets its share of the global batch
    each = TrainerSpec(trainer.name, trainer.target, replace(trainer.config, optim=replace(
        optim, batch_size=optim.batch_size // n)))
    spec = {"trainer": each.as_config(), "global_batch_size": optim.batch_size,
            "num_processes": n, "base_path": base_path, "init_adapter": init_adapter,
            "policy_adapter": policy_adapter, "adapter_out": str(adapter_out.resolve()), "seed": seed,
            "round_index": round_index, "config": config}
    (folder / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True, default=str) + "\n")
    command, env = _command(launch, config, work_dir, folder)  # first: a refused launch deletes nothing
    _drop_unresumable(work_dir, _launch_key(spec, folder / ROWS))
    started = time.time()
    code, tail = _stream(command, env, log_file)
    result = _read(folder / RESULT)
    if code != 0 or result is None:
        raise LaunchFailed(_failure(label, n, command, code, _read(folder / FAILURES), tail, log_file))
    return {**result["metrics"], "processes": n, "launch_seconds": round(time.time() - started, 1)}


def _launch_key(spec: dict, rows: Path) -> str:
    """What a checkpoint's meaning depends on: the spec but where the adapter goes, and the rows."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in spec.items() if k != "adapter_out"}, sort_keys=True,
                                       default=str).encode())
    digest.update(rows.read_bytes())
    return digest.hexdigest()


def _drop_unresumable(work_dir: Path, key: str) -> None:
    """Delete the checkpoints in `work_dir` that this launch's processes must not resume (see the module doc)."""
    key_file = work_dir / LAUNCH_KEY
    same = key_file.exists() and key_file.read_text() == key
    for path in work_dir.iterdir():
        match = CHECKPOINT.fullmatch(path.name)
        if match and path.is_dir() and not (same and is_complete(path, int(match.group(1)))):
            shutil.rmtree(path)
    key_file.write_text(key)


def forget_launch(work_dir: Path) -> None:
    """Called by the train stage before it trains in its own process on `work_dir`: the checkpoints written from
    now on are not a launch's, so a later launch must not take them for its own (their key in `training_key` is
    another training's, and every rank would then delete them at once)."""
    (Path(work_dir) / LAUNCH_KEY).unlink(missing_ok=True)


def _command(launch: Launch, config: dict | None, work_dir: Path, folder: Path) -> tuple[list[str], dict]:
    import torch

    n, config, env = launch.num_processes, config or {}, dict(os.environ)
    worker = ["-m", "selfimprove.trainers.launch", str(work_dir.resolve())]
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


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _failure(label: str, n: int, command: list[str], code: int, failures: dict | None, tail: list[str],
             log_file: Path) -> str:
    launcher = "accelerate launch" if "accelerate" in command else "torchrun"
    lines = [f"{label}: training under {n} processes failed: {launcher} exited with code {code}."]
    for rank, failure in sorted((failures or {}).items(), key=lambda item: int(item[0])):
        seen = f"exit code {failure['exitcode']}" + (f": {failure['signal']}" if failure["signal"] else "")
        what = failure["error"] or ("stopped by that signal (by the launcher after another process failed, or "
                                    "killed)" if failure["signal"] else "recorded no error")
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
        _write_json(Path(args[-1]) / "launch" / FAILURES, failures)
        return 1


def _train(work_dir: Path) -> None:
    """One launched process: build the trainer from the spec and train; rank 0 writes the result."""
    folder = work_dir / "launch"
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    spec = json.loads((folder / SPEC).read_text())
    if world != spec["num_processes"]:
        raise RuntimeError(f"this process was started as one of {world}, but the launch asked for "
                           f"{spec['num_processes']}: the launcher did not start the processes it was asked for")
    trainer = TrainerSpec.from_config(spec["trainer"], str(folder / SPEC), "trainer")
    with open(folder / ROWS) as f:
        rows = [json.loads(line) for line in f]
    # Every process saves (see the module doc); only rank 0 into the stage's adapter folder.
    out = Path(spec["adapter_out"]) if rank == 0 else folder / f".rank{rank}-adapter"
    metrics = trainer.build().train(rows, spec["base_path"], spec["init_adapter"], out, work_dir,
                                    seed=spec["seed"], round_index=spec["round_index"],
                                    policy_adapter=spec["policy_adapter"])
    if rank == 0:
        _write_json(folder / RESULT, {"metrics": metrics})
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


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
