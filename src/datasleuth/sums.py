"""The fit's running sums on any device without memory churn (docs/method.md §3).

Per batch EK-FAC adds a Gram matrix xᵀx to each float64 factor sum (pass 1) and the
squared rotated gradient of every sequence to the eigenvalue sum (pass 2). On a CPU a
fresh (n, n) or (B, P, M+1) product of a wide layer is hundreds of MiB that the
allocator maps and page-faults anew each batch, and widening it to float64 at once
makes a second such copy: together that cost more than the products themselves on a
Llama-1B block. Here products go to reused buffers and widening goes in row blocks;
the numbers are the plain expressions' own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from datasleuth.curvature import Basis, rotated_gradients, rotates_per_token
from datasleuth.layers import gather_mask, live_rows, live_tokens

__all__ = ["Workspace", "add_gram", "add_widened", "nonzero_rows", "sum_of_squares", "symmetrize"]

_ADD_CHUNK_BYTES = 4 << 20
GRAM_BLOCK = 512
"""Columns per strip of a triangular Gram (:func:`add_gram`); narrower factors (fewer than
three strips) are multiplied whole."""


def add_widened(total: Tensor, x: Tensor) -> None:
    """total += x for a float64 running sum and a lower-precision x, same bits as
    ``total += x.double()``. On a CPU in row blocks of 4 MiB: widening a whole wide
    factor at once allocates (and page-faults) a float64 copy of it, 3× slower for a
    8192-wide one."""
    if total.device.type != "cpu" or x.dtype == total.dtype or total.dim() == 0:
        total.add_(x)
        return
    rows = max(1, _ADD_CHUNK_BYTES // max(1, total[0].numel() * total.element_size()))
    for lo in range(0, total.shape[0], rows):
        total[lo : lo + rows].add_(x[lo : lo + rows])


class Workspace:
    """Reusable scratch matrices by (shape, dtype, device, slot). A CPU allocation of a
    wide layer's (P, M+1) or (n, n) product is page-faulted afresh every time (hundreds
    of MiB); reusing one per shape costs its memory once instead."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, shape: tuple[int, int], like: Tensor, slot: int = 0) -> Tensor:
        key = (shape, like.dtype, like.device, slot)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffers[key]


def nonzero_rows(x: Tensor) -> Tensor:
    """x (N, n) without its all-zero rows, or x itself when few are zero.

    All-zero rows (padding; the tokens not routed to an expert, docs/method.md §2) add
    nothing to xᵀx, and a mixture-of-experts layer sees mostly such rows (6 of 8 at
    top-2 of 8 experts). A row holding NaN is not zero and is kept.
    """
    keep = gather_mask(~(x == 0).all(-1))
    return x if keep is None else x[keep]


def add_gram(total: Tensor, x: Tensor, work: Workspace) -> None:
    """The lower triangle of total += xᵀ x (float64 total), formed in reused buffers.

    Only the lower triangle (diagonal included) is kept up to date: a factor wider than
    three :data:`GRAM_BLOCK` strips is multiplied strip by strip below the diagonal,
    x_{:,i}ᵀ x_{:,≤i}, which costs (k+1)/2k of the whole product in k strips (0.56 at
    GPT-2's 3072, 0.53 at Llama-1B's 8192). :func:`symmetrize` completes the sum.
    """
    n = x.shape[1]
    if n < 3 * GRAM_BLOCK:
        add_widened(total, torch.mm(x.t(), x, out=work.get((n, n), x)))
        return
    flat = work.get((1, GRAM_BLOCK * n), x)
    for lo in range(0, n, GRAM_BLOCK):
        hi = min(lo + GRAM_BLOCK, n)
        strip = flat[0, : (hi - lo) * hi].view(hi - lo, hi)
        add_widened(total[lo:hi, :hi], torch.mm(x[:, lo:hi].t(), x[:, :hi], out=strip))


def symmetrize(total: Tensor) -> Tensor:
    """Copy the lower triangle of a square sum to its upper one, in place, strip by strip
    (the sums of :func:`add_gram`); returns ``total``."""
    n = total.shape[0]
    for lo in range(0, n, GRAM_BLOCK):
        hi = min(lo + GRAM_BLOCK, n)
        total[lo:hi, hi:].copy_(total[hi:, lo:hi].t())
        diag = total[lo:hi, lo:hi]
        diag.copy_(diag.tril() + diag.tril(-1).t())
    return total


def sum_of_squares(a: Tensor, g: Tensor, q_out: Basis | None, q_in: Basis | None,
                    work: Workspace) -> Tensor:
    """Σ_b (Q_Sᵀ DW̄_b Q_A)^∘2 over the batch's sequences, (P, M+1) in a's dtype (§3).

    Rotated per token (when cheaper, :func:`rotates_per_token`), each sequence's product
    goes to one reused buffer, never a (B, P, M+1) tensor, and only tokens whose ā and Ds
    are both nonzero are rotated (:func:`datasleuth.layers.live_tokens`). The result is
    a workspace buffer: use it before the next call.
    """
    p, m1 = g.shape[-1], a.shape[-1]
    rows_a, rows_g, spans = live_rows(a, g, live_tokens(a, g))  # sequence after sequence
    if not rotates_per_token(max(1, rows_a.shape[0] // max(1, len(spans))), q_out, q_in, p, m1):
        return rotated_gradients(a, g, q_out, q_in, per_token=False).square_().sum(0)
    rows_a = q_in.to_basis(rows_a, -1) if q_in is not None else rows_a  # Q_Aᵀ ā_t
    rows_g = q_out.to_basis(rows_g, -1) if q_out is not None else rows_g  # Q_Sᵀ Ds_t
    prod, total = work.get((p, m1), a, 0), work.get((p, m1), a, 1)
    total.zero_()
    for _, rows in spans:
        total.add_(torch.mm(rows_g[rows].t(), rows_a[rows], out=prod).square_())
    return total
