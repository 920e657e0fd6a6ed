"""Two CPU processes on gloo: the harness of every model's data-parallel test."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, train: Callable) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(train(), os.path.join(out_dir, f"{rank}.pt"))
        # Both ranks leave together: a rank that tears gloo down while its peer still talks
        # can abort the peer.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_ranks(train: Callable[[], dict], tmp_path) -> list[dict]:
    """Run ``train`` (a module-level function) in two gloo processes; return what each returned.

    Whatever ``train`` returns is saved with torch.save and read back with weights_only=True, so
    it holds tensors, numbers, strings and containers of them.
    """
    args = (2, str(tmp_path / "init"), str(tmp_path), train)
    mp.spawn(_rank_main, args=args, nprocs=2, join=True)
    return [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1)]
