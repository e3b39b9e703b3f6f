"""Progress bars with rates and time left (tqdm), counted in units that move.

A bar over a DataLoader, or over a list of batch dicts, counts the examples in the
batches (``sequence`` for token batches, else ``example``), not the batches, so it
moves on every batch and its rate is a throughput. :func:`progress_counter` is a bar
that the caller advances by hand (e.g. sequences written to an index).

Interrupts: under :func:`interrupts_save` (the command line), SIGINT and SIGTERM inside a
:func:`snapshot_on_interrupt` block only ask the run to stop; the next snapshot point
(a fit's or a scan's saver, :func:`stop_requested`) writes its snapshot and raises
``KeyboardInterrupt``, so the re-run resumes where it was. A second signal, or one
outside such a block, interrupts at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tqdm.auto import tqdm

from datasleuth.distributed import world

__all__ = ["progress_bar", "progress_counter", "progress_enabled", "batch_rows",
           "interrupts_save", "snapshot_on_interrupt", "stop_requested"]

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


_INTERRUPT = {"savable": 0, "requested": False}


def stop_requested() -> bool:
    """Whether a signal asked the run to stop at its next snapshot point."""
    return bool(_INTERRUPT["requested"])


@contextmanager
def snapshot_on_interrupt() -> Iterator[None]:
    """A block whose savers snapshot on SIGINT/SIGTERM before stopping (see the module)."""
    _INTERRUPT["savable"] += 1
    try:
        yield
    finally:
        _INTERRUPT["savable"] -= 1


def _on_signal(signum: int, frame: Any) -> None:
    if _INTERRUPT["savable"] and not _INTERRUPT["requested"]:
        _INTERRUPT["requested"] = True  # the next snapshot point saves, then stops
        return
    raise KeyboardInterrupt


@contextmanager
def interrupts_save() -> Iterator[None]:
    """Route SIGINT and SIGTERM through :func:`stop_requested` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signals}
    _INTERRUPT["requested"] = False
    for s in signals:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _INTERRUPT["requested"] = False
