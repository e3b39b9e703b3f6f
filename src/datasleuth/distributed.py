"""Many processes through ``torch.distributed``: shard the data, sum the statistics.

One process is the default and needs nothing from this module. When
``torch.distributed`` is initialised (by ``torchrun``, or by the caller), each process
streams its own shard of the training data (:func:`shard`), and:

* curvature fitting (:func:`datasleuth.fit_curvature`, the projected curvature of an
  index) sums its statistics over processes before any eigendecomposition, so every
  process ends with the same factors as one process fitting the union of the shards --
  exactly with the empirical Fisher; with sampled labels (the default) each process
  draws its own labels (seed + rank), so the fit agrees in distribution;
* the language-model scan (:func:`datasleuth.lm.trace.scan_corpus`) scores a
  contiguous block of the corpus per process and merges the per-query top-k, bottom-k,
  histogram samples and counts, so every process returns the single-process result.

Collectives go through the default process group (gloo or NCCL); with NCCL, CPU
tensors are reduced through a copy on this process's GPU.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "active",
    "all_reduce_int",
    "all_reduce_sum",
    "barrier",
    "gather_objects",
    "init_from_environment",
    "local_device",
    "rank_seed",
    "rank_zero_first",
    "shard",
    "shutdown",
    "world",
]


def active() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard(n: int, rank: int | None = None, size: int | None = None) -> range:
    """This process's contiguous block of ``range(n)``; blocks differ in length by ≤ 1."""
    r, s = world()
    r = r if rank is None else rank
    s = s if size is None else size
    base, extra = divmod(n, s)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def rank_seed(seed: int) -> int:
    """Seed of this process's label sampler: ``seed`` alone, distinct per rank."""
    return seed + 1_000_003 * world()[0]


def all_reduce_sum(tensors: Sequence[Tensor]) -> None:
    """Sum each tensor over processes, in place (no-op for one process)."""
    if not active():
        return
    nccl = dist.get_backend() == "nccl"
    for t in tensors:
        if nccl and t.device.type == "cpu":  # NCCL reduces CUDA tensors only
            on_gpu = t.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_int(value: int, device: torch.device | str = "cpu") -> int:
    """The sum of an integer over processes (``device`` kept for NCCL callers)."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    all_reduce_sum([t])
    return int(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable, in-memory only), in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if active():
        dist.barrier()


@contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (which then reuse its files)."""
    rank, _ = world()
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()


def init_from_environment() -> bool:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); True if joined.

    The backend is NCCL when CUDA is available, else gloo; ``DATASLEUTH_DIST_BACKEND``
    overrides it. Collectives wait up to ``DATASLEUTH_DIST_TIMEOUT`` seconds (default a
    day): the other ranks wait at a barrier while rank 0 packs a large corpus.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = os.environ.get("DATASLEUTH_DIST_BACKEND") or (
            "nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        seconds = float(os.environ.get("DATASLEUTH_DIST_TIMEOUT", 86_400))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return True


def shutdown() -> None:
    """Wait for every process, then leave the group (a process that exits while its
    group is alive can abort in the backend's teardown)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def local_device(device: str) -> str:
    """``cuda`` becomes this process's GPU (``cuda:LOCAL_RANK``) under torchrun."""
    if device == "cuda" and active():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device
