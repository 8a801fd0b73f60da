"""The few collective operations the trainer needs, written so one process without a process group works too.

Every function is a no-op reduction when ``torch.distributed`` is not initialised (one rank), so the same
code runs in a single process, under Ray Train's workers and under ``torchrun``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (float64, so image counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks in place, on its device (no host sync on NCCL); returns ``t``."""
    if initialized():
        dist.all_reduce(t)
    return t


def gather(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    return gather(obj)[0]
