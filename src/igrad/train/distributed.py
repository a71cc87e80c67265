"""Several training processes (``torchrun``): ranks, the process group, and its collective operations."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import IgradError

__all__ = ["Dist", "select_device"]


@dataclass
class Dist:
    """This process's place in a ``torchrun`` job (``rank`` of ``world``; one process: rank 0 of 1), and the
    few collective operations training needs (no-ops for one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device_hint: str) -> Dist:
        """From torchrun's ``WORLD_SIZE``/``LOCAL_RANK``; joins (or creates, and then owns) the process group:
        nccl when the run is on CUDA, else gloo."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not dist.is_initialized():
            use_cuda = device_hint.startswith("cuda") or (device_hint == "auto" and torch.cuda.is_available())
            if use_cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if use_cuda else "gloo")
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), local, owns)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes, in place."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every process."""
        if self.world > 1:
            import torch.distributed as dist

            for b in model.buffers():
                dist.broadcast(b, 0)

    def shard(self, n: int) -> torch.Tensor:
        """This process's share of ``n`` items: indices ``rank, rank + world, ...``."""
        return torch.arange(self.rank, n, self.world)

    def close(self, *, finished: bool = True) -> None:
        """Destroy the process group when this object created it. After a ``finished`` run every process
        first waits for the others (a barrier): a process that tears its gloo connections down while
        another still finishes its last operations makes that one abort at exit. After an error there is
        no barrier, since the other processes may never arrive at it."""
        if self.owns_group:
            import torch.distributed as dist

            try:
                if finished:
                    dist.barrier()
            finally:
                dist.destroy_process_group()


def select_device(name: str, dist: Dist) -> torch.device:
    """The device of config value ``name``: ``auto`` is CUDA when available, else the CPU; ``cuda`` means
    this process's local rank's GPU. Clear :class:`IgradError` for unknown or unavailable devices."""
    cuda = torch.cuda.is_available()
    resolved = ("cuda" if cuda else "cpu") if name == "auto" else name
    if resolved == "cpu":
        return torch.device("cpu")
    if not resolved.startswith("cuda"):
        raise IgradError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")
    if not cuda:
        raise IgradError(f"device {name!r} asked for, but no CUDA GPU is available")
    try:
        return torch.device("cuda", dist.local_rank) if resolved == "cuda" else torch.device(resolved)
    except RuntimeError as exc:
        raise IgradError(f"bad device {name!r}: {exc}") from exc
