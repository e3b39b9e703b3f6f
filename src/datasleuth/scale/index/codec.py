"""How an index stores its rows: floats, or quantised to 8 or 4 bits (docs/method.md §11).

A quantised row keeps, for every layer's slice x of the row, one float32 scale
s = max|x| / L and the integer codes c = round(x / s) ∈ [−L, L] (L = 127 for ``"int8"``,
7 for ``"int4"``, two codes packed in a byte as c + 8). The decoded row is c·s, so every
number is off by at most s/2 and a score q·row by at most (s/2)·‖q_ℓ‖₁ per layer.
Rounding errors of different coordinates are nearly independent and cancel in the
inner product; at a fixed byte budget a quantised row therefore keeps 2× (int8) or 4×
(int4) as many coordinates as a float16 one, which is worth far more agreement with
full EK-FAC than the rounding costs (README, "Index").

A shard file holds ``rows`` (n, D) in the float dtype, or for quantised storage
``codes`` (n, D) int8 or (n, ⌈D/2⌉) uint8 and ``scales`` (n, layers) float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from datasleuth.errors import DatasleuthError

__all__ = ["FLOAT_DTYPES", "QUANTISED", "decode", "encode", "numbers_within", "row_bytes",
           "stored_shapes"]

FLOAT_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
QUANTISED = {"int8": 127, "int4": 7}  # largest code magnitude L


def row_bytes(dtype: str, widths: Sequence[int]) -> int:
    """Bytes a row of layer slices ``widths`` takes in storage ``dtype``."""
    d = int(sum(widths))
    if dtype in FLOAT_DTYPES:
        return d * FLOAT_DTYPES[dtype].itemsize
    return (d if dtype == "int8" else math.ceil(d / 2)) + 4 * len(widths)


def numbers_within(bytes_per_row: int, dtype: str, layers: int) -> int:
    """The most numbers a row of ``layers`` slices can hold in ``bytes_per_row`` bytes."""
    if dtype in FLOAT_DTYPES:
        return bytes_per_row // FLOAT_DTYPES[dtype].itemsize
    left = max(0, bytes_per_row - 4 * layers)
    return left if dtype == "int8" else 2 * left


def stored_shapes(dtype: str, n: int, widths: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The tensors of a shard of ``n`` rows and the shape each must have."""
    d = int(sum(widths))
    if dtype in FLOAT_DTYPES:
        return {"rows": (n, d)}
    return {"codes": (n, d if dtype == "int8" else math.ceil(d / 2)),
            "scales": (n, len(widths))}


def encode(rows: Tensor, widths: Sequence[int], dtype: str) -> dict[str, Tensor]:
    """The shard tensors of float ``rows`` (n, D) in storage ``dtype``; refuses non-finite
    values (they would decode to garbage, not to an error)."""
    if dtype in FLOAT_DTYPES:
        stored = rows.to(FLOAT_DTYPES[dtype])
        if not bool(torch.isfinite(stored).all()):
            raise DatasleuthError(
                f"projected gradients are not finite in {dtype} (max |x| = "
                f"{float(rows.abs().max()):.3g}); use IndexConfig(dtype='float32')")
        return {"rows": stored}
    if not bool(torch.isfinite(rows).all()):
        raise DatasleuthError("projected gradients are not finite; check the model's weights "
                              "and the fitted curvature")
    top = QUANTISED[dtype]
    codes = torch.empty(rows.shape, dtype=torch.int8)
    scales = torch.zeros(len(rows), len(widths), dtype=torch.float32)
    lo = 0
    for j, w in enumerate(widths):  # slice by slice: no (n, D) temporaries beyond one
        part = rows[:, lo : lo + w].float()
        if w:
            scales[:, j] = part.abs().amax(1) / top
            inv = 1.0 / scales[:, j].clamp_min(torch.finfo(torch.float32).tiny)
            codes[:, lo : lo + w] = (part * inv[:, None]).round_().clamp_(-top, top)
        lo += w
    if dtype == "int8":
        return {"codes": codes, "scales": scales}
    return {"codes": _pack4(codes), "scales": scales}


def decode(tensors: Mapping[str, np.ndarray | Tensor], widths: Sequence[int], dtype: str,
           out: torch.dtype | None = None) -> Tensor:
    """Rows (n, D) from shard tensors (numpy or torch), as ``out`` (default: the float
    storage dtype, float32 for quantised storage)."""
    if dtype in FLOAT_DTYPES:
        rows = torch.as_tensor(np.asarray(tensors["rows"]))
        return rows if out is None else rows.to(out)
    out = torch.float32 if out is None else out
    codes = torch.as_tensor(np.asarray(tensors["codes"]))
    d = int(sum(widths))
    codes = codes if dtype == "int8" else _unpack4(codes, d)
    scales = torch.as_tensor(np.asarray(tensors["scales"])).to(out)
    rows = codes.to(out)
    lo = 0
    for j, w in enumerate(widths):
        rows[:, lo : lo + w] *= scales[:, j : j + 1]
        lo += w
    return rows


def _pack4(codes: Tensor) -> Tensor:
    """(n, D) int8 codes in [−7, 7] -> (n, ⌈D/2⌉) uint8, two per byte (low nibble first)."""
    c = codes.add_(8).view(torch.uint8)  # in place: the codes are this call's own
    if c.shape[1] % 2:
        c = torch.cat([c, torch.full((len(c), 1), 8, dtype=torch.uint8)], 1)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def _unpack4(packed: Tensor, d: int) -> Tensor:
    """Inverse of :func:`_pack4`: (n, ⌈D/2⌉) uint8 -> (n, D) int8."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], 2).reshape(len(packed), -1)[:, :d]
