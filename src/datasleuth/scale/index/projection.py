"""Seeded Kronecker projections of layer gradients, and the projected scorer (§7).

Per layer, P_out (k_out×P) and P_in (k_in×(M+1)) have entries N(0, 1/k), so that
E[‖Px‖²] = ‖x‖² (Choe et al. 2024, §3); each is drawn from a generator seeded by
(seed, layer name, side) and stored in the index directory, so an index never depends
on the random-number generator of a later torch version.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from datasleuth.layers import TrackedLayer
from datasleuth.scale.index.config import IndexConfig

__all__ = ["LayerProjection", "ProjectedScorer", "make_projections"]


def _layer_seed(seed: int, name: str, side: str) -> int:
    digest = hashlib.sha256(f"datasleuth-index:{seed}:{name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _gaussian(k: int, d: int, seed: int) -> Tensor:
    """(k, d) matrix with entries N(0, 1/k), so E[‖Px‖²] = ‖x‖² (Choe et al. 2024, §3)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(k)


@dataclass
class LayerProjection:
    """P_out (k_out×P) and P_in (k_in×(M+1)) of one layer; ``None`` = identity."""

    name: str
    k_out: int
    k_in: int
    p_out: Tensor | None
    p_in: Tensor | None

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    def project(self, a: Tensor, g: Tensor) -> Tensor:
        """Σ_t (P_out Ds_t)(P_in ā_t)ᵀ, flattened: (B,T,M+1), (B,T,P) -> (B, k_out·k_in)."""
        if self.p_in is not None:
            a = a @ self.p_in.to(a.device, a.dtype).t()  # (B, T, k_in)
        if self.p_out is not None:
            g = g @ self.p_out.to(g.device, g.dtype).t()  # (B, T, k_out)
        return torch.bmm(g.transpose(1, 2), a).reshape(a.shape[0], -1)  # (B, k_out·k_in)

    def project_dense(self, grad: Tensor) -> Tensor:
        """P_out V P_inᵀ for explicit layer gradients V (..., P, M+1), flattened; references."""
        if self.p_out is not None:
            grad = self.p_out.to(grad.dtype) @ grad
        if self.p_in is not None:
            grad = grad @ self.p_in.to(grad.dtype).t()
        return grad.reshape(*grad.shape[:-2], -1)


def make_projections(layers: Sequence[TrackedLayer], config: IndexConfig
                     ) -> list[LayerProjection]:
    """The projections of ``config`` for every layer, in layer order."""
    out = []
    for layer in layers:
        k_out, k_in = config.dims(layer)
        p, m = layer.grad_shape
        if config.projection == "identity":
            out.append(LayerProjection(layer.name, p, m, None, None))
        else:
            out.append(LayerProjection(
                layer.name, k_out, k_in,
                _gaussian(k_out, p, _layer_seed(config.seed, layer.name, "out")),
                _gaussian(k_in, m, _layer_seed(config.seed, layer.name, "in")),
            ))
    return out


class ProjectedScorer:
    """Scores one layer's captured (ā, Ds) against projected queries q̃ (Q, D_ℓ).

    A :class:`~datasleuth.scoring.LayerScorer`: the scan of a corpus with these gives
    exactly the scores its index rows give, q̃ᵀ (P_out DW̄ P_inᵀ), without storing rows.
    """

    def __init__(self, projection: LayerProjection, queries: Tensor):
        self.projection = projection
        self.queries = queries  # (Q, D_ℓ)

    def __call__(self, a: Tensor, g: Tensor) -> Tensor:
        if self.queries.dtype != a.dtype or self.queries.device != a.device:
            self.queries = self.queries.to(a.device, a.dtype)
        return self.projection.project(a, g) @ self.queries.t()  # (B, Q)
