"""torchrun / DistributedDataParallel plumbing: one code path for 1 or N processes."""
from __future__ import annotations

import os
from dataclasses import dataclass

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


def setup_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)


def current() -> DistInfo:
    """The running process's place in the group (single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity for one process)."""
    if current().enabled:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= current().world
    return value


def barrier() -> None:
    if current().enabled:
        dist.barrier()
