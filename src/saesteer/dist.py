"""Rank and world size under torchrun, one definition for collection, training and evaluation.

Outside an initialised torch.distributed process group (a plain run, or torchrun before the CLI has
joined the group) every helper answers as a single process: rank 0 of 1, barriers do nothing and
`sharded` runs the whole list here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as tdist


def init() -> bool:
    """Join the torchrun process group when launched under torchrun with several processes; whether it did."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return False
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def rank() -> int:
    return rank_world()[0]


def world_size() -> int:
    return rank_world()[1]


def is_main() -> bool:
    """Rank 0 (the only process of a plain run): the one that writes files and shows progress."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world_size() > 1:
        tdist.barrier()


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks in place; returns it."""
    if world_size() > 1:
        tdist.all_reduce(t)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `t` on every rank with rank `src`'s copy, in place; returns it."""
    if world_size() > 1:
        tdist.broadcast(t, src)
    return t


def sharded(fn: Callable[[list], list], items: list) -> list:
    """fn over items; under torchrun each rank takes items i % world == rank and all ranks get the merged list."""
    me, world = rank_world()
    if world == 1:
        return fn(items)
    mine = fn(items[me::world])
    gathered: list = [None] * world
    tdist.all_gather_object(gathered, mine)
    merged = [None] * len(items)
    for r, part in enumerate(gathered):
        merged[r::world] = part
    return merged
