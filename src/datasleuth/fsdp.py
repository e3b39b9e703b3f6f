"""Models larger than one device: PyTorch's FSDP2 ``fully_shard`` under ``torchrun``.

:func:`shard_model` shards every transformer block and the root over all processes
(``torch.distributed.fsdp.fully_shard`` on a 1-D device mesh). Each process still
streams its own block of the data (:mod:`datasleuth.distributed`), and nothing in the
method changes: FSDP gathers a block's weights before its forward and backward, so the
tracked layers' forward hooks see this process's inputs ā and their output hooks this
process's gradients Ds, exactly as without sharding; statistics and top-k lists are
summed and merged over processes as in plain data parallelism. Only the weight
gradients, which the capture never computes, would have been reduce-scattered.

One rule FSDP adds: every process must run the same number of forward and backward
passes, since each gathers weights collectively. :func:`lockstep` lets a process whose
shard has run out replay its last batch (its captures discarded) until every process
is done. Tested on CPU with gloo (2 processes equal 1 in float64); NCCL not yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from datasleuth.distributed import active, all_reduce_int, world
from datasleuth.errors import DatasleuthError

__all__ = ["is_sharded", "lockstep", "shard_model"]

T = TypeVar("T")


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP2 shards (DTensors) in a process group."""
    if not active():
        return False
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units to shard: modules of the classes a transformers model says not to
    split (``_no_split_modules``), else the items of the model's longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place over every process with FSDP2 and return it.

    Needs a process group (``torchrun``; :func:`datasleuth.distributed.init_from_environment`)
    and the model on this process's device (``cuda:LOCAL_RANK``, or the CPU with gloo).
    """
    if not active():
        raise DatasleuthError("--fsdp shards the model over processes; start the command with "
                              "torchrun --nproc-per-node N (N >= 2)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (world()[1],))
    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def lockstep(batches: Iterable[T], device: torch.device) -> Iterator[tuple[T, bool]]:
    """Yield (batch, True) for this process's batches, then (its last batch, False)
    while any other process still has batches, so all run the same number of passes."""
    last: Any = None
    it = iter(batches)
    while True:
        item = next(it, None)
        if all_reduce_int(int(item is not None), device) == 0:
            return
        if item is not None:
            last = item
            yield item, True
        elif last is None:
            raise DatasleuthError(
                f"process {world()[0]} has no batch while others do; a sharded model needs "
                "at least one batch per process: use fewer processes or a smaller batch size"
            )
        else:
            yield last, False
