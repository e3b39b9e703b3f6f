"""Progress bars with rates and time left (tqdm), counted in units that move.

A bar over a DataLoader, or over a list of batch dicts, counts the examples in the
batches (``sequence`` for token batches, else ``example``), not the batches, so it
moves on every batch and its rate is a throughput. :func:`progress_counter` is a bar
that the caller advances by hand (e.g. sequences written to an index).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

from datasleuth.distributed import world

__all__ = ["progress_bar", "progress_counter", "progress_enabled", "batch_rows"]

T = TypeVar("T")


def progress_enabled(enabled: bool = True) -> bool:
    """Whether bars are drawn: asked for, ``DATASLEUTH_PROGRESS`` not ``0``, rank 0."""
    return enabled and os.environ.get("DATASLEUTH_PROGRESS", "1") != "0" and world()[0] == 0


def batch_rows(batch: Any) -> int:
    """Examples in a batch: the first dimension of its first tensor (1 if it has none)."""
    if isinstance(batch, dict):
        first = batch.get("input_ids", next(iter(batch.values()), None))
    elif isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
    else:
        first = batch
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) > 0 else 1


def _example_total(iterable: Any) -> tuple[int | None, str] | None:
    """(examples, unit) for a DataLoader or a list of batch dicts; None for anything else."""
    from torch.utils.data import DataLoader

    if isinstance(iterable, DataLoader):
        dataset = iterable.dataset
        total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
        return total, "example"
    if isinstance(iterable, list) and iterable and all(isinstance(b, dict) for b in iterable):
        return sum(batch_rows(b) for b in iterable), "sequence"
    return None


def progress_bar(
    iterable: Iterable[T],
    desc: str,
    enabled: bool = True,
    total: int | None = None,
    unit: str | None = None,
    weight: Callable[[T], int] | None = None,
) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr; ``DATASLEUTH_PROGRESS=0`` disables all bars.

    Each item advances the bar by ``weight(item)`` (default 1). A DataLoader or a list
    of batch dicts is counted in examples (:func:`batch_rows`); the unit is
    ``sequence`` when the batches hold ``input_ids``. Under torch.distributed only
    rank 0 draws bars.
    """
    if not progress_enabled(enabled):
        return iterable
    counted = _example_total(iterable) if weight is None else None
    if counted is not None:
        total = counted[0] if total is None else total
        return _weighted(iterable, desc, total, unit, counted[1], batch_rows)
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if weight is not None:
        return _weighted(iterable, desc, total, unit, "item", weight)
    return tqdm(iterable, desc=desc, total=total, unit=unit or "item", file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _weighted(iterable: Iterable[T], desc: str, total: int | None, unit: str | None,
              default_unit: str, weight: Callable[[T], int]) -> Iterator[T]:
    """Yield the items, advancing a bar by each one's weight; the unit is chosen from the
    first item (``sequence`` for batches of ``input_ids``) unless given."""
    bar = None
    try:
        for item in iterable:
            if bar is None:
                name = unit or ("sequence" if isinstance(item, dict) and "input_ids" in item
                                else default_unit)
                bar = tqdm(desc=desc, total=total, unit=name, file=sys.stderr,
                           dynamic_ncols=True, leave=False)
            yield item
            bar.update(weight(item))
    finally:
        if bar is not None:
            bar.close()


class _Counter:
    """A bar advanced by hand; does nothing when bars are off."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> _Counter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_counter(desc: str, total: int | None, enabled: bool = True,
                     unit: str = "sequence", initial: int = 0) -> _Counter:
    """A bar of ``total`` ``unit`` advanced with ``.update(n)``; use it as a context."""
    if not progress_enabled(enabled):
        return _Counter(None)
    return _Counter(tqdm(desc=desc, total=total, unit=unit, initial=initial, file=sys.stderr,
                         dynamic_ncols=True, leave=False))
