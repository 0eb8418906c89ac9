"""Run by tests/test_ddp.py: 2 gloo processes each hold a shard of every gradient (as under FSDP);
the all-reduced total norm must equal the norm of the whole, unsharded gradient. Not a test module."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from lightning_clip import functional as F

    torch.manual_seed(0)
    full = [torch.randn(101), torch.randn(7, 3), torch.randn(1)]
    # rank r holds elements r, r + world, ... of each flattened gradient (rank 1 holds nothing of the last)
    shards = [g.flatten()[rank::world] for g in full]
    results = {}
    for p in (1.0, 2.0, 3.0, float("inf")):
        results[str(p)] = float(F.total_norm(F.grad_norms(shards, p), p, all_reduce=F.distributed_all_reduce()))
    # a rank with no local gradients at all still joins (else rank 0 would hang here)
    mine = shards if rank == 0 else []
    results["empty_rank"] = float(F.total_norm(F.grad_norms(mine, 2.0), 2.0, all_reduce=F.distributed_all_reduce()))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    out, port = sys.argv[1], int(sys.argv[2])
    mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
