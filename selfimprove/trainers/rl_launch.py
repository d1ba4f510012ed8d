"""The rl stage under several processes: a persistent group of workers, each holding a replica of the
policy-gradient policy, that the stage drives one call at a time.

With `launch: {num_processes: N}` (N > 1) the rl stage (stages/rl.py) trains through `LaunchedPolicy`, which has
the interface of `PolicyGradient` (`setup`, `step`, `save`, `version`, `history`). `setup` starts the worker group
once for the whole stage, with the launcher the train stage uses (trainers/launch.py: torchrun over gloo on a
CPU, `accelerate launch` on GPUs), every process running `python -m selfimprove.trainers.rl_launch <work_dir>`.
Only the stage's process samples, scores and talks to the engine; the workers only train. They meet through
files in `<work_dir>/launch/`:

    spec.json                   the trainer as its YAML form, `setup`'s arguments, the number of processes
    request-NNNNN.json          call N: `step` (all of the step's rollouts), `save` (a folder) or `stop`
    reply-NNNNN.json            rank 0's answer to call N (written once every rank is done with it), with the
                                policy's version and history; the stage deletes a call's two files once answered
    failures.json               when processes failed: each one's rank, exit code or signal and error (launch.py)
    <stage folder>/train.log    every process's output, as it comes (appended per launch)

A step on N processes is the one-process step, up to float summation order (tests/test_rl_launch.py): every
process reads the whole batch, so the baseline's group statistics (and reinforce_pp's batch normalisation) and
the loss's batch-wide denominators are the one-process ones; each process back-propagates only its own groups
(`Shard.mine`: whole groups, dealt out by token count, the same split on every process), and the gradients are
summed over the processes (`torch.distributed.all_reduce`) before clipping and the optimizer step, so every
replica takes the same step and stays identical (checked at every save). Rank 0 writes each version (adapter and
optimizer state) and the stage commits it as in one process; a resumed stage starts every worker from the newest
committed version, as it starts the in-process trainer.

A process that dies or raises stops the group (torch elastic stops the others), and the stage, which watches the
launcher while it waits for an answer, fails naming the rank, its exit code or signal and its error. Nothing of
the step in progress is kept, so a rerun resumes from the last committed version.

Deviations and limits:
- The optimizer state is replicated, not sharded: the workers all-reduce the adapter's gradients themselves
  (one flat buffer per step), which is DDP's arithmetic. A LoRA adapter's AdamW state is small, so DeepSpeed
  (ZeRO-2 shards exactly that) is refused when the config loads rather than silently not applied.
- The workers and the engine share the machine: on GPUs, the engine's memory settings must leave room for N
  training processes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..artifacts import read_json, write_json
from ..lifecycle import signal_group
from ..records import Rollout
from ..registry import TrainerSpec
from .launch import FAILURES, SPEC, TAIL_LINES, Launch, LaunchFailed, failure, read_or_none, worker_command

MODULE = "selfimprove.trainers.rl_launch"
POLL_S = 0.05  # how often the stage and the workers look for each other's files
STOP_S = 60  # a stopped group's time to exit before it is killed


def check(launch: Launch) -> None:
    """Config-load check that the rl stage can run under `launch` (see the module doc)."""
    config = launch.accelerate_config() if launch.num_processes > 1 else None
    if config and config.get("distributed_type") == "DEEPSPEED":
        raise ValueError(f"launch.config: {launch.config}: the rl stage's workers sum the adapter's gradients "
                         f"themselves and keep its (small) optimizer state whole on every process, so DeepSpeed's "
                         f"sharding would not apply; use configs/accelerate/ddp.yaml or no config")


class Shard:
    """One process's part of a step: which rollouts it back-propagates, and the sums over all processes."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def mine(self, groups: list[str], sizes: list[int]) -> list[int]:
        """The indices of this process's rollouts: whole groups, the largest first (in tokens, `sizes`) to the
        process with the fewest tokens so far (ties: the first group seen, the lowest rank), so that every
        process, seeing the same batch, derives the same split."""
        members: dict[str, list[int]] = {}
        for i, group in enumerate(groups):
            members.setdefault(group, []).append(i)
        load, mine = [0] * self.world, []
        for group in sorted(members, key=lambda g: -sum(sizes[i] for i in members[g])):  # stable on ties
            rank = min(range(self.world), key=lambda r: load[r])
            load[rank] += sum(sizes[i] for i in members[group])
            if rank == self.rank:
                mine += members[group]
        return sorted(mine)

    def reduce(self, params: list, sums: dict[str, float], gaps: list) -> tuple[dict, list]:
        """Sum the gradients of `params` over the processes in place (a process without rollouts adds zeros), and
        the loss and KL sums; gather every process's sampler-gap tensors (`gaps`: (trainer, sampler) pairs)."""
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])  # one collective, not one per LoRA matrix
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        totals = torch.tensor(list(sums.values()), dtype=torch.float64, device=flat.device)
        dist.all_reduce(totals)
        everyone = [None] * self.world
        dist.all_gather_object(everyone, [(mine.cpu(), theirs.cpu()) for mine, theirs in gaps])
        return dict(zip(sums, totals.tolist())), [pair for part in everyone for pair in part]


class LaunchedPolicy:
    """`PolicyGradient`'s interface, trained by a worker group (see the module doc). Use it as a context manager:
    leaving the block stops the workers (kills them when it is left by an exception)."""

    def __init__(self, launch: Launch, trainer: TrainerSpec, work_dir: Path, log_file: Path, label: str):
        self.launch, self.trainer = launch, trainer
        self.work_dir, self.log_file, self.label = Path(work_dir), Path(log_file), label
        self.folder = self.work_dir / "launch"
        self.version: str | None = None
        self.history: list[str] = []
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.calls = 0

    def __enter__(self) -> "LaunchedPolicy":
        return self

    def __exit__(self, kind, *_) -> None:
        self.close(failed=kind is not None)

    def setup(self, base_path: str, adapter: str | None, seed: int, state: Path | None = None,
              earlier: list[str] = ()) -> None:
        """Start the workers, each loading the policy as `PolicyGradient.setup` with these arguments does."""
        if self.process is not None:
            raise RuntimeError(f"{self.label}: the worker group is already running")
        config = self.launch.accelerate_config()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        write_json(self.folder / SPEC, {
            "trainer": self.trainer.as_config(), "num_processes": self.launch.num_processes,
            "setup": {"base_path": base_path, "adapter": adapter, "seed": seed,
                      "state": str(Path(state).resolve()) if state is not None else None, "earlier": list(earlier)}})
        self.command, env = worker_command(self.launch, config, self.work_dir, self.folder, module=MODULE)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "a", buffering=1)  # line-buffered: each line reaches the file as it comes
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(self.command)}\n")
        # A process group of its own, which `close` stops whole (the launcher and its workers)
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                        text=True, errors="replace", start_new_session=True)
        self._pump = threading.Thread(target=self._copy_output, args=(self.process.stdout, log), daemon=True,
                                      name="rl-launch-log")
        self._pump.start()
        self._answer(0)  # the workers write call 0's answer once they have loaded the policy

    def step(self, rollouts: list[Rollout], kl_weights: list[float], temperature: float, max_tokens: int,
             max_staleness: int = 0) -> dict:
        return self._call({"op": "step", "rollouts": [dataclasses.asdict(r) for r in rollouts],
                           "kl_weights": list(kl_weights), "temperature": temperature, "max_tokens": max_tokens,
                           "max_staleness": max_staleness})

    def save(self, folder: Path) -> str:
        return self._call({"op": "save", "folder": str(Path(folder).resolve())})

    def close(self, failed: bool = False) -> None:
        """Stop the workers: a `stop` call and their exit, or (`failed`, or no exit in time) their process group
        killed. A group that exits with an error after a clean run fails the stage still."""
        if self.process is None:
            return
        process, self.process = self.process, None
        code = process.poll()
        if code is None and not failed:
            self.calls += 1
            write_json(self.folder / f"request-{self.calls:05d}.json", {"op": "stop"})
            try:
                code = process.wait(STOP_S)
            except subprocess.TimeoutExpired:
                pass
        if code is None:
            for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                signal_group(process.pid, sig)
                try:
                    process.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            code = process.returncode
        self._pump.join(timeout=10)
        if not failed and code == 0:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        elif not failed:
            raise LaunchFailed(self._failure(code))

    def _call(self, request: dict):
        if self.process is None:
            raise RuntimeError(f"{self.label}: the worker group is not running (setup first)")
        self.calls += 1
        write_json(self.folder / f"request-{self.calls:05d}.json", request)
        return self._answer(self.calls)

    def _answer(self, call: int):
        """Rank 0's answer to `call`, waiting for it while the group lives; the call's files are deleted."""
        reply = self.folder / f"reply-{call:05d}.json"
        while not reply.exists():
            if self.process.poll() is not None and not reply.exists():
                code = self.process.returncode
                self._pump.join(timeout=10)  # the output's last lines, for the message
                raise LaunchFailed(self._failure(code))
            time.sleep(POLL_S)
        answer = read_json(reply)
        reply.unlink()
        (self.folder / f"request-{call:05d}.json").unlink(missing_ok=True)
        self.version, self.history = answer["version"], answer["history"]
        return answer["result"]

    def _failure(self, code: int | None) -> str:
        return failure(self.label, self.launch.num_processes, self.command, code,
                       read_or_none(self.folder / FAILURES), list(self.tail), self.log_file)

    def _copy_output(self, output, log) -> None:
        with log:
            for line in output:  # text mode: a progress bar's \r ends a line too
                log.write(line)
                if line.strip():
                    self.tail.append(line.rstrip("\n"))


# -- a worker: `python -m selfimprove.trainers.rl_launch <work_dir>` (started by LaunchedPolicy.setup) -----------

def _serve(work_dir: Path) -> None:
    """Load the policy, then answer the stage's calls in order until `stop`; rank 0 writes the answers."""
    import torch
    import torch.distributed as dist

    folder = work_dir / "launch"
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    spec = json.loads((folder / SPEC).read_text())
    if world != spec["num_processes"]:
        raise RuntimeError(f"this process was started as one of {world}, but the launch asked for "
                           f"{spec['num_processes']}: the launcher did not start the processes it was asked for")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # PolicyGradient uses the current device
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    trainer = TrainerSpec.from_config(spec["trainer"], str(folder / SPEC), "trainer").build()
    setup = spec["setup"]
    trainer.setup(setup["base_path"], setup["adapter"], seed=setup["seed"],
                  state=Path(setup["state"]) if setup["state"] else None, earlier=setup["earlier"])
    shard, call, result = Shard(rank, world), 0, None
    while True:
        dist.barrier()  # every rank is done with this call: the stage may delete its files once answered
        if rank == 0:
            write_json(folder / f"reply-{call:05d}.json",
                       {"result": result, "version": trainer.version, "history": trainer.history})
        call += 1
        request = _wait_for(folder / f"request-{call:05d}.json")
        if request["op"] == "stop":
            break
        if request["op"] == "step":
            result = trainer.step([Rollout(**r) for r in request["rollouts"]], request["kl_weights"],
                                  request["temperature"], request["max_tokens"], request["max_staleness"],
                                  shard=shard)
        elif request["op"] == "save":
            result = _save(trainer, Path(request["folder"]), rank)
        else:
            raise ValueError(f"unknown call {request['op']!r} in {folder}")
    dist.destroy_process_group()


def _save(trainer, folder: Path, rank: int) -> str:
    """Rank 0 writes the version; every rank takes its hash as its own (the replicas are checked identical)."""
    import torch.distributed as dist

    digest = hashlib.sha256()
    for p in trainer.model.parameters():
        if p.requires_grad:
            digest.update(p.detach().float().cpu().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"the policy's replicas differ across processes ({digests}): a step did not reduce "
                           f"the same gradients everywhere")
    version = [trainer.save(folder) if rank == 0 else None]
    dist.broadcast_object_list(version, src=0)
    if rank:  # what PolicyGradient.save records, without writing a second copy
        trainer.version = version[0]
        trainer.history.append(version[0])
    return version[0]


def _wait_for(path: Path) -> dict:
    while not path.exists():
        time.sleep(POLL_S)
    return read_json(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m selfimprove.trainers.rl_launch <work_dir>  (started by the rl stage)",
              file=sys.stderr)
        return 2
    from torch.distributed.elastic.multiprocessing.errors import record  # torch: only in a launched process

    record(_serve)(Path(argv[0]))  # an exception goes to the error file the elastic agent gave this process
    return 0


if __name__ == "__main__":
    sys.exit(main())
