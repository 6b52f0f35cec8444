"""torchrun / DistributedDataParallel plumbing: one code path for 1 or N processes on 1 or M machines.

Rule for every training entry point: the configured ``batch_size`` is the *global* batch; each of the
``world`` processes takes an equal contiguous slice of it (``batch_size / world`` samples), gradients
are averaged across processes, and the learning rate is left as configured. So N processes take the
same optimisation steps as one process would (up to float rounding, per-rank dropout and BatchNorm
statistics). ``batch_size`` must be divisible by ``world``.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(backend: str | None = None, timeout_min: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op for a single process.

    NCCL on CUDA (one GPU per process, chosen by LOCAL_RANK), gloo on the CPU. ``timeout_min`` bounds
    how long a collective waits for a rank that died, so a crash ends the job instead of hanging it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and backend != "gloo":
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPU(s) are visible on "
                               f"this machine; lower --nproc_per_node to at most the number of GPUs")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def teardown_distributed(wait: bool = True) -> None:
    """Leave the process group at the end of a command: after every rank got there (``wait``), or at
    once after an error (a failed rank must not wait for peers that may never arrive)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def current() -> DistInfo:
    """The running process's place in the group (single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def per_rank_batch(global_batch: int, world: int | None = None, setting: str = "batch_size") -> int:
    """Samples each process takes from a global batch; a clear error when they cannot be equal."""
    world = current().world if world is None else world
    if global_batch % world:
        raise ValueError(
            f"the global batch ({setting}={global_batch}) is not divisible by the {world} processes; set "
            f"{setting} to a multiple of {world} or change --nproc_per_node/--nnodes (each process takes "
            f"{setting} / world samples; the learning rate is not rescaled)")
    return global_batch // world


def _collective_device() -> torch.device:
    """Where small tensors for a collective must live: the process's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity for one process)."""
    if current().enabled:
        device = value.device
        value = value.detach().to(_collective_device(), copy=True)
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = (value / current().world).to(device)
    return value


def int_range_across_ranks(value: int) -> tuple[int, int]:
    """(min, max) of an integer over ranks: equal when every rank agrees (e.g. on a resume step)."""
    if not current().enabled:
        return value, value
    lo = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return int(lo.item()), int(hi.item())


def broadcast_int(value: int) -> int:
    """Rank 0's value of an integer (|value| < 2**63) on every rank."""
    if not current().enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.broadcast(t, src=0)
    return int(t.item())


def barrier() -> None:
    if current().enabled:
        dist.barrier()


@contextlib.contextmanager
def rank0_first() -> Iterator[None]:
    """Run a block on rank 0 first, then on the other ranks: for steps that fill a cache on disk
    (body model, mesh hierarchy, benchmark) so the others read it instead of racing to write it."""
    info = current()
    if info.enabled and not info.is_main:
        dist.barrier()
    yield
    if info.enabled and info.is_main:
        dist.barrier()


def launch(command_args: Sequence[str], nproc: int, timeout_s: float | None = 48 * 3600.0) -> str:
    """Run ``python -m vqhps <command_args>`` in ``nproc`` processes under torchrun on this machine.

    What notebooks call when ``nproc > 1`` (with one process they call the library in-process); the
    workers' output streams through, and a failure or a run past ``timeout_s`` raises RuntimeError /
    TimeoutError naming the command and quoting the end of its output. Returns the output's tail."""
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"nproc={nproc} but only {torch.cuda.device_count()} GPU(s) are visible; use at most "
                         f"one process per GPU")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vqhps", *map(str, command_args)]
    shown = " ".join(cmd[2:])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    tail: deque[str] = deque(maxlen=400)
    reader = threading.Thread(target=_pump, args=(proc, tail), daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        reader.join(timeout=10)
        raise TimeoutError(f"`{shown}` ran past its {timeout_s:.0f} s limit and was stopped; last output:\n"
                           f"{_tail_text(tail)}") from None
    except BaseException:  # e.g. KeyboardInterrupt in a notebook: do not leave workers behind
        _stop_group(proc)
        raise
    reader.join(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`{shown}` failed with exit code {proc.returncode}; last output:\n{_tail_text(tail)}")
    return _tail_text(tail)


def _pump(proc: subprocess.Popen, tail: deque) -> None:
    """Copy the child's output to ours as it comes (progress bars included) and keep its tail."""
    assert proc.stdout is not None
    while True:
        chunk = proc.stdout.read1(8192) if hasattr(proc.stdout, "read1") else proc.stdout.read(8192)
        if not chunk:
            break
        text = chunk.decode(errors="replace")
        sys.stdout.write(text)
        sys.stdout.flush()
        tail.append(text)


def _tail_text(tail: deque, limit: int = 6000) -> str:
    return "".join(tail)[-limit:]


def _stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Terminate the launcher and its workers (their own process group), then kill what remains."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
