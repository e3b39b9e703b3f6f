"""Seeded Kronecker projections of (whitened) layer gradients, and the projected scorer.

docs/method.md §11. Per layer, P_out (k_out×P) and P_in (k_in×(M+1)) have entries N(0, 1/k),
so that E[‖Px‖²] = ‖x‖² (Choe et al. 2024, §3); each is drawn from a generator seeded by
(seed, layer name, side) and stored in the index directory, so an index never depends
on the random-number generator of a later torch version.

Whitening (``IndexConfig.whitening``) multiplies the layer gradient by a square root W of
the fitted damped curvature, W² ≈ (G_ℓ + λ_ℓ I)⁻¹, before projecting, so that the inner
product of two rows estimates vᵀ(G + λI)⁻¹g, the influence itself (Hu et al. 2026,
arXiv 2602.10449):

* ``"ekfac"``: W = (Λ + λ)^(−1/2) in the EK-FAC eigenbasis. The per-sequence gradient is
  formed in that basis, C = Σ_t (Q_Sᵀ Ds_t)(Q_Aᵀ ā_t)ᵀ (P×(M+1)), divided elementwise by
  √(Λ + λ) and projected: row = P_out C̃ P_inᵀ. Exact EK-FAC metric, build cost one
  (P×T)·(T×(M+1)) product per layer and sequence on top of the backward pass.
* ``"kron"``: W = W_S ⊗ W_A with W_S = Q_S diag(u) Q_Sᵀ, W_A = Q_A diag(v) Q_Aᵀ, where
  u_i v_j is the closest product (least squares on logarithms) to (Λ_ij + λ)^(−1/2). W_A
  and W_S are folded into the projections (P_in W_A, P_out W_S), so the build costs what
  an unwhitened one does: inputs and output gradients projected token by token.
* ``projection="eigen"`` with ``"ekfac"``: instead of a random sketch, keep the D_ℓ
  eigen-coordinates of C̃ with the largest Λ/(Λ + λ), which is E_seq[C̃²] (EK-FAC fits Λ
  as the second moment of C): the truncation that keeps most of the whitened training
  gradients' expected energy. Biased (drops the rest) but without sketch variance.
* ``"none"``: plain projections (LoGra); queries are preconditioned by a curvature
  refitted in the projected space (:mod:`.curvature`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from datasleuth.curvature import Curvature, LayerCurvature
from datasleuth.errors import DatasleuthError, listed
from datasleuth.layers import TrackedLayer
from datasleuth.scale.index.config import IndexConfig

__all__ = ["LayerProjection", "ProjectedScorer", "kron_root", "make_projections"]


def _layer_seed(seed: int, name: str, side: str) -> int:
    digest = hashlib.sha256(f"datasleuth-index:{seed}:{name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _gaussian(k: int, d: int, seed: int) -> Tensor:
    """(k, d) matrix with entries N(0, 1/k), so E[‖Px‖²] = ‖x‖² (Choe et al. 2024, §3)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(k)


@dataclass
class LayerProjection:
    """P_out (k_out×P) and P_in (k_in×(M+1)) of one layer; ``None`` = identity.

    With EK-FAC whitening, ``q_out`` (P×P) and ``q_in`` ((M+1)×(M+1)) are the eigenbases
    and ``scale`` (P×(M+1)) is (Λ + λ)^(−1/2); the projections act on eigen-coordinates.
    """

    name: str
    k_out: int
    k_in: int
    p_out: Tensor | None
    p_in: Tensor | None
    q_out: Tensor | None = None
    q_in: Tensor | None = None
    scale: Tensor | None = None
    select: Tensor | None = None  # kept flat eigen-coordinates (projection="eigen")
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def _on(self, name: str, like: Tensor) -> Tensor:
        """Matrix ``name`` on ``like``'s device and dtype, converted once per pair."""
        key = (name, like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(like.device, like.dtype)
        return self._cache[key]

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    def project(self, a: Tensor, g: Tensor) -> Tensor:
        """Row of each sequence from per-token (B,T,M+1), (B,T,P) -> (B, k_out·k_in)."""
        if self.scale is not None:
            return self._project_ekfac(a, g)
        if self.p_in is not None:
            a = a @ self._on("p_in", a).t()  # (B, T, k_in)
        if self.p_out is not None:
            g = g @ self._on("p_out", g).t()  # (B, T, k_out)
        return torch.bmm(g.transpose(1, 2), a).reshape(a.shape[0], -1)  # (B, k_out·k_in)

    def _project_ekfac(self, a: Tensor, g: Tensor) -> Tensor:
        a = a @ self._on("q_in", a)  # Q_Aᵀ ā_t, (B, T, M+1)
        g = g @ self._on("q_out", g)  # Q_Sᵀ Ds_t, (B, T, P)
        c = torch.bmm(g.transpose(1, 2), a) * self._on("scale", a)  # (B, P, M+1)
        return self._sketch(c)

    def _sketch(self, c: Tensor) -> Tensor:
        """P_out C P_inᵀ (or the selected coordinates of C), flattened: (..., P, M+1) ->
        (..., k_out·k_in)."""
        if self.select is not None:
            return c.reshape(*c.shape[:-2], -1)[..., self._on_index(c)]
        if self.p_out is not None:
            c = self._on("p_out", c) @ c
        if self.p_in is not None:
            c = c @ self._on("p_in", c).t()
        return c.reshape(*c.shape[:-2], -1)

    def _on_index(self, like: Tensor) -> Tensor:
        key = ("select", like.device)
        if key not in self._cache:
            self._cache[key] = self.select.to(like.device)
        return self._cache[key]

    def project_dense(self, grad: Tensor) -> Tensor:
        """The row of explicit layer gradients V (..., P, M+1); references and tests."""
        if self.scale is not None:
            grad = self.q_out.to(grad.dtype).t() @ grad @ self.q_in.to(grad.dtype)
            grad = grad * self.scale.to(grad.dtype)
        return self._sketch(grad)

    def tensors(self) -> dict[str, Tensor]:
        """What :func:`~.store` writes for this layer (absent matrices are identities)."""
        named = {"out": self.p_out, "in": self.p_in, "q_out": self.q_out, "q_in": self.q_in,
                 "scale": self.scale, "select": self.select}
        return {f"{self.name}/{k}": v for k, v in named.items() if v is not None}


def kron_root(layer: LayerCurvature) -> tuple[Tensor, Tensor]:
    """W_S (P×P), W_A ((M+1)×(M+1)) with W_S ⊗ W_A ≈ (G_ℓ + λ_ℓ I)^(−1/2) (docs/method.md §11).

    In the Kronecker eigenbasis the exact root is diagonal, (Λ_ij + λ)^(−1/2); its closest
    rank-one product u_i v_j in log space (row and column means of log(Λ + λ)) is
    applied per token as W_S = Q_S diag(u) Q_Sᵀ and W_A = Q_A diag(v) Q_Aᵀ.
    """
    _require_basis(layer)
    logs = torch.log(layer.eigenvalues.double().clamp_min(0) + layer.damping)  # (P, M+1)
    rows, cols = logs.mean(1), logs.mean(0) - logs.mean()
    qs, qa = layer.q_out.dense().double(), layer.q_in.dense().double()
    w_s = qs @ torch.diag(torch.exp(-0.5 * rows)) @ qs.t()
    w_a = qa @ torch.diag(torch.exp(-0.5 * cols)) @ qa.t()
    return w_s, w_a


def _require_basis(layer: LayerCurvature) -> None:
    if layer.q_out is None or layer.q_in is None:
        raise DatasleuthError("whitening needs K-FAC or EK-FAC curvature (Kronecker "
                              "eigenbases); fit it with FitConfig(curvature='ekfac')")


def _whitened(layer: TrackedLayer, curv: LayerCurvature, whitening: str,
              sketch: tuple[Tensor | None, Tensor | None], k: tuple[int, int],
              dtype: torch.dtype | None = None) -> LayerProjection:
    p_out, p_in = sketch
    if whitening == "kron":
        w_s, w_a = kron_root(curv)
        p_out = w_s if p_out is None else p_out @ w_s
        p_in = w_a if p_in is None else p_in @ w_a
        return LayerProjection(layer.name, k[0], k[1], p_out, p_in)
    _require_basis(curv)  # bases and root kept in ``dtype``: the gradients' own
    dtype = dtype or curv.eigenvalues.dtype
    sigma = curv.eigenvalues.double().clamp_min(0)
    scale = (sigma + curv.damping).rsqrt().to(dtype)
    select = None
    if sketch == ("eigen", "eigen"):  # the coordinates of most expected whitened energy
        energy = (sigma / (sigma + curv.damping)).reshape(-1)
        select = torch.sort(torch.topk(energy, k[0] * k[1]).indices).values
        p_out = p_in = None
    return LayerProjection(layer.name, k[0], k[1], p_out, p_in, curv.q_out.dense().to(dtype),
                           curv.q_in.dense().to(dtype), scale, select)


def make_projections(layers: Sequence[TrackedLayer], config: IndexConfig,
                     curvature: Curvature | None = None, dtype: torch.dtype | None = None
                     ) -> list[LayerProjection]:
    """The projections of ``config`` for every layer, in layer order (whitened by
    ``curvature`` unless ``config.whitening == "none"``; the EK-FAC bases and root in
    ``dtype``, the dtype gradients are computed in, default the curvature's)."""
    if config.whitening != "none":
        if curvature is None:
            raise DatasleuthError(f"whitening={config.whitening!r} needs the fitted curvature; "
                                  "pass curvature=fit_curvature(...) to build_index, or "
                                  "IndexConfig(whitening='none')")
        missing = [ly.name for ly in layers if ly.name not in curvature.layers]
        if missing:
            raise DatasleuthError(f"the curvature lacks layers {listed(missing)}; fit it on the "
                                  "layers the index tracks")
    out = []
    for layer in layers:
        k_out, k_in = config.dims(layer)
        p, m = layer.grad_shape
        if config.projection == "identity":
            sketch: tuple[Any, Any] = (None, None)
            k_out, k_in = p, m
        elif config.projection == "eigen":
            sketch = ("eigen", "eigen")
        else:
            sketch = (_gaussian(k_out, p, _layer_seed(config.seed, layer.name, "out")),
                      _gaussian(k_in, m, _layer_seed(config.seed, layer.name, "in")))
        if config.whitening == "none":
            out.append(LayerProjection(layer.name, k_out, k_in, *sketch))
        else:
            out.append(_whitened(layer, curvature.layers[layer.name], config.whitening,
                                 sketch, (k_out, k_in), dtype))
    return out


class ProjectedScorer:
    """Scores one layer's captured (ā, Ds) against projected queries q̃ (Q, D_ℓ).

    A :class:`~datasleuth.scoring.LayerScorer`: the scan of a corpus with these gives
    exactly the scores its index rows give, q̃ᵀ row, without storing rows.
    """

    def __init__(self, projection: LayerProjection, queries: Tensor):
        self.projection = projection
        self.queries = queries  # (Q, D_ℓ)

    def __call__(self, a: Tensor, g: Tensor) -> Tensor:
        if self.queries.dtype != a.dtype or self.queries.device != a.device:
            self.queries = self.queries.to(a.device, a.dtype)
        return self.projection.project(a, g) @ self.queries.t()  # (B, Q)
