"""How an index stores its rows: floats, or quantised to 8, 4, 2 or 1 bits (§11).

A quantised row keeps, for every layer's slice x of the row, one float32 scale s and one
b-bit code u per number; the number decodes to T_b[u]·s:

* ``"int8"``, ``"int4"`` (uniform): s = max|x| / L, L = 2^(b−1) − 1, u = round(x/s) + 2^(b−1),
  T_b[u] = u − 2^(b−1); every number is off by at most s/2.
* ``"int2"`` (Lloyd-Max): u the cell of x/r among the thresholds (−0.9816, 0, 0.9816),
  r the slice's root mean square, T_2 = (−1.510, −0.4528, 0.4528, 1.510): the
  four-level quantiser of least squared error for Gaussian numbers (Max 1960); then s
  = Σ x T[u] / Σ T[u]², the scale of least squared error for those codes.
* ``"int1"`` (sign): s = mean |x| (the scale of least squared error for sign codes),
  u = [x > 0], T_1 = (−1, 1).

Rounding errors of different coordinates are nearly independent and largely cancel in
the inner product of a query with a row, so in a fixed number of bytes more coordinates
at fewer bits agree better with full EK-FAC, until every coordinate worth keeping fits
(measured: README, "Index"; :func:`datasleuth.scale.index.sizing.auto_config` picks the
bits). Codes are packed 8/b to a byte, lowest bits first.

A shard file holds ``rows`` (n, D) in the float dtype, or for quantised storage
``codes`` (n, ⌈D·b/8⌉) (int8 for ``"int8"``, else uint8) and ``scales`` (n, layers)
float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from datasleuth.errors import DatasleuthError
from datasleuth.finite import all_finite

__all__ = ["FLOAT_DTYPES", "QUANTISED", "decode", "encode", "numbers_within", "row_bytes",
           "stored_shapes"]

FLOAT_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
QUANTISED = {"int8": 8, "int4": 4, "int2": 2, "int1": 1}  # bits per number
_OUTER_2 = 0.9816  # Max's thresholds are ±0.9816 and 0
_LEVELS_2 = (-1.510, -0.4528, 0.4528, 1.510)


def _levels(bits: int) -> Tensor:
    """T_b: the value of each code, in units of the slice's scale."""
    if bits == 2:
        return torch.tensor(_LEVELS_2)
    if bits == 1:
        return torch.tensor([-1.0, 1.0])
    return torch.arange(2**bits, dtype=torch.float32) - 2 ** (bits - 1)


def row_bytes(dtype: str, widths: Sequence[int]) -> int:
    """Bytes a row of layer slices ``widths`` takes in storage ``dtype``."""
    d = int(sum(widths))
    if dtype in FLOAT_DTYPES:
        return d * FLOAT_DTYPES[dtype].itemsize
    return math.ceil(d * QUANTISED[dtype] / 8) + 4 * len(widths)


def numbers_within(bytes_per_row: int, dtype: str, layers: int) -> int:
    """The most numbers a row of ``layers`` slices can hold in ``bytes_per_row`` bytes."""
    if dtype in FLOAT_DTYPES:
        return bytes_per_row // FLOAT_DTYPES[dtype].itemsize
    return max(0, bytes_per_row - 4 * layers) * 8 // QUANTISED[dtype]


def stored_shapes(dtype: str, n: int, widths: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The tensors of a shard of ``n`` rows and the shape each must have."""
    d = int(sum(widths))
    if dtype in FLOAT_DTYPES:
        return {"rows": (n, d)}
    return {"codes": (n, math.ceil(d * QUANTISED[dtype] / 8)), "scales": (n, len(widths))}


def encode(rows: Tensor, widths: Sequence[int], dtype: str) -> dict[str, Tensor]:
    """The shard tensors of float ``rows`` (n, D) in storage ``dtype``; refuses non-finite
    values (they would decode to garbage, not to an error)."""
    if dtype in FLOAT_DTYPES:
        stored = rows.to(FLOAT_DTYPES[dtype])
        if not all_finite(stored):
            raise DatasleuthError(
                f"projected gradients are not finite in {dtype} (max |x| = "
                f"{float(rows.abs().max()):.3g}); use IndexConfig(dtype='float32')")
        return {"rows": stored}
    if not all_finite(rows):
        raise DatasleuthError("projected gradients are not finite; check the model's weights "
                              "and the fitted curvature")
    bits, d = QUANTISED[dtype], int(sum(widths))
    codes = torch.empty(len(rows), math.ceil(d * bits / 8), dtype=torch.uint8)
    scales = torch.zeros(len(rows), len(widths), dtype=torch.float32)
    for r in range(0, len(rows), _chunk_rows(d)):  # small temporaries: cache, no page faults
        part, lo = rows[r : r + _chunk_rows(d)], 0
        block = torch.empty(part.shape, dtype=torch.uint8)
        for j, w in enumerate(widths):
            if w:
                scales[r : r + len(part), j], block[:, lo : lo + w] = _quantise(
                    part[:, lo : lo + w].float(), bits)
            lo += w
        codes[r : r + len(part)] = block if bits == 8 else _pack(block, bits)
    if bits == 8:  # u − 128 = c, in two's complement
        return {"codes": codes.sub_(128).view(torch.int8), "scales": scales}
    return {"codes": codes, "scales": scales}


def _chunk_rows(d: int) -> int:
    """Rows per block of encoding or decoding: about 4 M numbers."""
    return max(1, (1 << 22) // max(1, d))


def _quantise(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(scale (n,), codes (n, w) uint8) of one layer's slice x (n, w), float32."""
    tiny = torch.finfo(torch.float32).tiny
    if bits == 1:
        scale = x.abs().mean(1)
        return scale, (x > 0).to(torch.uint8)
    if bits == 2:  # cells at the RMS, then the least-squares scale of their levels
        a = x.abs()
        rms = x.square().mean(1).sqrt()
        big = a > _OUTER_2 * rms[:, None]  # |x| beyond the outer thresholds
        mag = torch.where(big, _LEVELS_2[3], _LEVELS_2[2])  # |T[u]|; T[u] has x's sign
        scale = (a * mag).sum(1) / mag.square().sum(1)
        pos = (x > 0).to(torch.uint8)  # u = 0, 1 (negative), 2, 3 (positive)
        big = big.to(torch.uint8)
        return scale, 1 + pos + big * (2 * pos) - big
    top = 2 ** (bits - 1) - 1
    scale = x.abs().amax(1) / top
    c = (x * (1.0 / scale.clamp_min(tiny))[:, None]).round_().clamp_(-top, top)
    return scale, c.add_(2 ** (bits - 1)).to(torch.uint8)


def decode(tensors: Mapping[str, np.ndarray | Tensor], widths: Sequence[int], dtype: str,
           out: torch.dtype | None = None) -> Tensor:
    """Rows (n, D) from shard tensors (numpy or torch), as ``out`` (default: the float
    storage dtype, float32 for quantised storage)."""
    if dtype in FLOAT_DTYPES:
        rows = torch.as_tensor(np.asarray(tensors["rows"]))
        return rows if out is None else rows.to(out)
    out = torch.float32 if out is None else out
    codes = torch.as_tensor(np.asarray(tensors["codes"]))
    scales = torch.as_tensor(np.asarray(tensors["scales"])).to(out)
    bits, d = QUANTISED[dtype], int(sum(widths))
    rows = torch.empty(len(codes), d, dtype=out)
    levels = _levels(bits).to(out)
    for r in range(0, len(codes), _chunk_rows(d)):
        part = codes[r : r + _chunk_rows(d)]
        if bits == 8:
            block = part.to(out)
        else:
            block = levels.index_select(0, _unpack(part, bits, d).flatten().int())
            block = block.reshape(len(part), d)
        lo = 0
        for j, w in enumerate(widths):
            block[:, lo : lo + w] *= scales[r : r + len(part), j : j + 1]
            lo += w
        rows[r : r + len(part)] = block
    return rows


def _pack(codes: Tensor, bits: int) -> Tensor:
    """(n, D) uint8 codes < 2^bits -> (n, ⌈D·bits/8⌉) uint8, lowest bits first."""
    per = 8 // bits
    n, d = codes.shape
    pad = -d % per
    if pad:
        codes = torch.cat([codes, torch.zeros(n, pad, dtype=torch.uint8)], 1)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (codes.reshape(n, -1, per) << shifts).sum(2, dtype=torch.uint8)


def _unpack(packed: Tensor, bits: int, d: int) -> Tensor:
    """Inverse of :func:`_pack`: (n, ⌈D·bits/8⌉) uint8 -> (n, D) uint8."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    return codes.reshape(len(packed), -1)[:, :d]
