"""torchrun helpers: a plain process is rank 0 of 1, and `sharded` splits and merges work in order."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from saesteer import dist


def test_a_plain_process_is_rank_zero_of_one():
    assert dist.rank_world() == (0, 1) and dist.is_main() and not dist.init()
    dist.barrier()
    t = torch.ones(3)
    assert dist.all_reduce(t) is t and torch.equal(t, torch.ones(3))
    assert dist.sharded(lambda items: [x * 2 for x in items], [1, 2, 3]) == [2, 4, 6]


def _worker(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        merged = dist.sharded(lambda items: [(x, dist.rank()) for x in items], list(range(7)))
        total = dist.all_reduce(torch.tensor([float(rank + 1)]))
        out.put((rank, merged, total.item()))
    finally:
        tdist.destroy_process_group()


def test_sharded_work_is_split_by_rank_and_merged_in_order():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(2, port, queue), nprocs=2, join=True)
    results = sorted(queue.get() for _ in range(2))
    expected = [(x, x % 2) for x in range(7)]  # item i runs on rank i % world
    assert [merged for _, merged, _ in results] == [expected, expected]
    assert [total for _, _, total in results] == [3.0, 3.0]
