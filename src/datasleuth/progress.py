"""Progress bars with rates and time left (tqdm), silent when not wanted."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

from datasleuth.distributed import world

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T],
    desc: str,
    enabled: bool = True,
    total: int | None = None,
    unit: str = "batch",
) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr; ``DATASLEUTH_PROGRESS=0`` disables all bars.

    Under torch.distributed only rank 0 draws bars.
    """
    if not enabled or os.environ.get("DATASLEUTH_PROGRESS", "1") == "0" or world()[0] != 0:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                leave=False)
