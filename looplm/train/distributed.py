"""Process-group set-up for ``torchrun``: DDP over gloo (CPU) or nccl (CUDA).

Without the torchrun environment (``WORLD_SIZE`` unset or 1) everything is single-process
and these helpers are no-ops.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process sits: ``rank`` of ``world`` and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    """Join the process group torchrun describes in the environment (once per process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def teardown() -> None:
    """Leave the process group while the interpreter is fully alive.

    DDP wrappers keep the group (and gloo's worker threads) alive past ``destroy_process_group``
    until they are collected; left to the interpreter's exit, that collection can abort the
    process ("terminate called without an active exception"). Collect them first.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def all_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few floats over all processes (float64)."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_float(value: float, d: Dist) -> float:
    """Rank 0's value, seen by every process (e.g. its clock, so all stop at the same step)."""
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.broadcast(t, 0)
    return float(t.item())


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()
