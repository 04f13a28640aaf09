"""Processes and devices: THE device choice, and the torchrun process group (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from inspect import signature

import torch
import torch.distributed as dist
from torch import nn


def default_device() -> torch.device:
    """CUDA when present, else the CPU: the device chapters, the trainer and the evaluation use."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Dist:
    """Process layout: ``rank`` of ``world`` processes (1 without torchrun) and the device.
    ``group``: reduce and wrap in DDP even with one process (a 1-process group: the GPU check)."""

    rank: int
    world: int
    device: torch.device
    group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        """Whether sums go through the process group and the model through DDP."""
        return self.world > 1 or self.group

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over processes (``t`` itself without a process group)."""
        if self.parallel:
            t = t.to(self.device).clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` itself without a process group, else DDP over it (rebuild after replacing parameters)."""
        if not self.parallel:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # every process loaded the same weights: skip DDP's start-up broadcast where it has the option (torch 2.7)
        skip_sync = {"init_sync": False} if "init_sync" in signature(DistributedDataParallel).parameters else {}
        return DistributedDataParallel(model, device_ids=ids, **skip_sync)

    def local_slice(self, n: int) -> slice:
        """This process's share of a global batch of ``n`` (contiguous, in rank order)."""
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


def init_distributed() -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL with CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, default_device())
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def close_distributed() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()
