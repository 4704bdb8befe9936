"""Data-parallel training across processes started by ``torchrun``.

Slides are sharded across ranks; every rank trains the same number of steps (DDP all-reduces the
gradients at each backward), predictions are gathered to every rank so they all take the same
model-selection decisions, and only rank 0 writes files. Without ``torchrun`` this is one
process and every helper is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world`` processes, on ``device``."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. Otherwise the named device ("cpu", "cuda", "cuda:1")."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {preference}: CUDA is not available on this machine")
    return device


def init_distributed(preference: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, pick_device(preference))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def shard(items: Sequence[T], info: DistInfo, equal: bool = False) -> list[T]:
    """This rank's share: items[rank::world]. ``equal`` pads every share to the same length by
    wrapping around, so each rank takes the same number of training steps."""
    mine = list(items[info.rank::info.world])
    if equal and info.enabled and items:
        per_rank = -(-len(items) // info.world)
        while len(mine) < per_rank:
            mine.append(items[(info.rank + len(mine) * info.world) % len(items)])
    return mine


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def on_main(fn, info: DistInfo):
    """Run ``fn()`` on rank 0 only and hand its result, or its exception, to every rank, so that a
    check made once (e.g. of the output folder) stops all ranks alike instead of leaving them
    waiting at the next barrier."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as err:  # re-raised on every rank below
            error = err
    if info.enabled:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_session(preference: str = "auto") -> Iterator[DistInfo]:
    """:func:`init_distributed` on entry and :func:`shutdown` on exit, however the block ends."""
    info = init_distributed(preference)
    try:
        yield info
    finally:
        shutdown(info)
