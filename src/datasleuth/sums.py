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

__all__ = ["Workspace", "add_gram", "add_widened", "sum_of_squares"]

_ADD_CHUNK_BYTES = 4 << 20


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


def add_gram(total: Tensor, x: Tensor, work: Workspace) -> None:
    """total += xᵀ x (float64 total), the product formed in a reused buffer."""
    n = x.shape[1]
    add_widened(total, torch.mm(x.t(), x, out=work.get((n, n), x)))


def sum_of_squares(a: Tensor, g: Tensor, q_out: Basis | None, q_in: Basis | None,
                    work: Workspace) -> Tensor:
    """Σ_b (Q_Sᵀ DW̄_b Q_A)^∘2 over the batch's sequences, (P, M+1) in a's dtype (§3).

    Rotated per token (when cheaper, :func:`rotates_per_token`), each sequence's product
    goes to one reused buffer, never a (B, P, M+1) tensor. The result is a workspace
    buffer: use it before the next call.
    """
    p, m1 = g.shape[-1], a.shape[-1]
    if not rotates_per_token(a.shape[1], q_out, q_in, p, m1):
        return rotated_gradients(a, g, q_out, q_in, per_token=False).square_().sum(0)
    a = q_in.to_basis(a, -1) if q_in is not None else a  # Q_Aᵀ ā_t, (B, T, M+1)
    g = q_out.to_basis(g, -1) if q_out is not None else g  # Q_Sᵀ Ds_t, (B, T, P)
    prod, total = work.get((p, m1), a, 0), work.get((p, m1), a, 1)
    total.zero_()
    for b in range(a.shape[0]):
        total.add_(torch.mm(g[b].t(), a[b], out=prod).square_())
    return total
