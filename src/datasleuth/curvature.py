"""Per-layer damped curvature and the one preconditioning path all variants share.

Every variant (identity, diagonal, K-FAC, EK-FAC) is stored the same way: an eigenbasis
of the layer's input side Q_A ((M+1)×(M+1)) and output side Q_S (P×P), possibly
block-diagonal or absent (= the standard basis), and eigenvalues Λ (P×(M+1)) in that
Kronecker basis. The inverse-Hessian-vector product is then (docs/method.md §3;
George et al. 2018; Grosse et al. 2023, Eq. 20-21)

    (G_ℓ + λ_ℓ I)⁻¹ V = Q_S [ (Q_Sᵀ V Q_A) ⊘ (Λ + λ_ℓ) ] Q_Aᵀ.

* identity: no basis, Λ = 0, λ = 1 — the plain gradient dot product;
* diagonal: no basis, Λ = E_seq[DW̄²] — the diagonal Fisher;
* K-FAC:   Q_A, Q_S from A = E[ā āᵀ], S = E[Ds Dsᵀ]; Λ = T̄ · λ_S λ_Aᵀ;
* EK-FAC:  same bases, Λ = E_seq[(Q_Sᵀ DW̄_seq Q_A)^∘2].

T̄ is the mean number of unmasked tokens per sequence, so that K-FAC and EK-FAC both
approximate the Gauss-Newton matrix of the per-sequence summed loss, G = E_seq[JᵀHJ].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from datasleuth.errors import DatasleuthError

__all__ = ["Basis", "LayerCurvature", "Curvature", "CURVATURES", "EIGH_TOLERANCE",
           "eigh_batched", "rotated_gradients", "rotates_per_token"]

CURVATURES = ("identity", "diagonal", "kfac", "ekfac")


class Basis:
    """An orthonormal basis stored as diagonal blocks Q_1..Q_O (block-diagonal Q)."""

    def __init__(self, blocks: Sequence[Tensor]):
        self.blocks = [b.contiguous() for b in blocks]
        sizes = [b.shape[0] for b in self.blocks]
        self.bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        self.dim = sum(sizes)

    def _apply(self, v: Tensor, dim: int, transpose: bool) -> Tensor:
        v = v.movedim(dim, -1)
        if len(self.blocks) == 1:
            q = self.blocks[0].to(v.dtype)
            out = v @ (q.t() if transpose else q)
        else:
            out = torch.cat(
                [
                    v[..., s:e] @ (q.to(v.dtype).t() if transpose else q.to(v.dtype))
                    for (s, e), q in zip(self.bounds, self.blocks)
                ],
                dim=-1,
            )
        return out.movedim(-1, dim)

    def to_basis(self, v: Tensor, dim: int) -> Tensor:
        """Coordinates Qᵀv of the vectors along ``dim``."""
        return self._apply(v, dim, transpose=False)

    def from_basis(self, v: Tensor, dim: int) -> Tensor:
        """Vectors Qc from coordinates c along ``dim``."""
        return self._apply(v, dim, transpose=True)

    def dense(self) -> Tensor:
        """The full (block-diagonal) matrix Q."""
        return torch.block_diag(*self.blocks)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> Basis:
        """The same basis on ``device`` (in ``dtype``: rotating in it then converts nothing)."""
        return Basis([b.to(device=device, dtype=dtype) for b in self.blocks])

    def cost(self) -> int:
        """Multiply-adds of rotating one vector, Σ_i n_i² over the blocks."""
        return sum(b.shape[0] ** 2 for b in self.blocks)


@dataclass
class LayerCurvature:
    """Damped curvature of one layer in a Kronecker eigenbasis (see module docstring)."""

    eigenvalues: Tensor  # (P, M+1) in the Kronecker eigenbasis
    damping: float
    q_out: Basis | None = None  # Q_S, (P, P)
    q_in: Basis | None = None  # Q_A, (M+1, M+1)
    s_eigenvalues: Tensor | None = None  # Λ_S of S = E[Ds Dsᵀ] (K-FAC, EK-FAC), (P,)
    a_eigenvalues: Tensor | None = None  # Λ_A of A = E[ā āᵀ] (K-FAC, EK-FAC), (M+1,)

    def factor(self, side: str) -> Tensor:
        """The token-averaged Kronecker factor A (``"in"``) or S (``"out"``), block-diagonal."""
        basis, lam = (self.q_in, self.a_eigenvalues) if side == "in" else (
            self.q_out, self.s_eigenvalues)
        if basis is None or lam is None:
            raise DatasleuthError("only K-FAC and EK-FAC curvature has Kronecker factors")
        q = basis.dense().double()
        return q @ torch.diag(lam.double()) @ q.t()

    def rotate(self, v: Tensor) -> Tensor:
        """Q_Sᵀ V Q_A for V of shape (..., P, M+1)."""
        if self.q_out is not None:
            v = self.q_out.to_basis(v, -2)
        if self.q_in is not None:
            v = self.q_in.to_basis(v, -1)
        return v

    def unrotate(self, v: Tensor) -> Tensor:
        """Q_S V Q_Aᵀ, the inverse of :meth:`rotate`."""
        if self.q_out is not None:
            v = self.q_out.from_basis(v, -2)
        if self.q_in is not None:
            v = self.q_in.from_basis(v, -1)
        return v

    def rotated_gradients(self, a: Tensor, g: Tensor) -> Tensor:
        """Q_Sᵀ DW̄_b Q_A per sequence from ā (B,T,M+1), Ds (B,T,P) (:func:`rotated_gradients`)."""
        return rotated_gradients(a, g, self.q_out, self.q_in)

    def inverse_eigenvalues(self, dtype: torch.dtype) -> Tensor:
        """1 / (Λ + λ), (P, M+1)."""
        return 1.0 / (self.eigenvalues.to(dtype) + self.damping)

    def precondition(self, v: Tensor) -> Tensor:
        """(G_ℓ + λ_ℓ I)⁻¹ V for V of shape (..., P, M+1) (docs/method.md §3)."""
        return self.unrotate(self.rotate(v) * self.inverse_eigenvalues(v.dtype))

    def quadratic(self, v: Tensor) -> Tensor:
        """vec(V)ᵀ (G_ℓ + λ_ℓ I)⁻¹ vec(V) for each V in (..., P, M+1) -> (...)."""
        r = self.rotate(v)
        return (r.square() * self.inverse_eigenvalues(v.dtype)).sum((-2, -1))

    def dense(self) -> Tensor:
        """The damped matrix G_ℓ + λ_ℓ I over vec(V) in row-major (P, M+1) order; tests only."""
        p, m = self.eigenvalues.shape
        eye_p = torch.eye(p, dtype=torch.float64)
        eye_m = torch.eye(m, dtype=torch.float64)
        qs = self.q_out.dense().double() if self.q_out is not None else eye_p
        qa = self.q_in.dense().double() if self.q_in is not None else eye_m
        q = torch.kron(qs, qa)  # row-major vec(Q_S C Q_Aᵀ) = (Q_S ⊗ Q_A) vec(C)
        lam = self.eigenvalues.double().reshape(-1) + self.damping
        return q @ torch.diag(lam) @ q.t()

    def to(self, device: torch.device | str) -> LayerCurvature:
        return LayerCurvature(
            self.eigenvalues.to(device),
            self.damping,
            self.q_out.to(device) if self.q_out is not None else None,
            self.q_in.to(device) if self.q_in is not None else None,
            self.s_eigenvalues.to(device) if self.s_eigenvalues is not None else None,
            self.a_eigenvalues.to(device) if self.a_eigenvalues is not None else None,
        )


@dataclass
class Curvature:
    """Fitted curvature for every tracked layer, with the metadata of how it was made."""

    kind: str
    layers: dict[str, LayerCurvature]
    metadata: dict = field(default_factory=dict)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Apply (G_ℓ + λ_ℓ I)⁻¹ layer by layer (block-diagonal G)."""
        return {name: self.layers[name].precondition(v) for name, v in grads.items()}

    def to(self, device: torch.device | str) -> Curvature:
        layers = {n: c.to(device) for n, c in self.layers.items()}
        return Curvature(self.kind, layers, dict(self.metadata))

    def save(self, path: str) -> None:
        """Write tensors and metadata to one safetensors file, atomically."""
        from datasleuth.storage import save_curvature

        save_curvature(self, path)


def _cost(basis: Basis | None) -> int:
    return basis.cost() if basis is not None else 0


def rotates_per_token(t: int, q_out: Basis | None, q_in: Basis | None, p: int, m1: int
                      ) -> bool:
    """Whether rotating T tokens costs no more multiply-adds than rotating the summed
    (P, M+1) gradient (:func:`rotated_gradients`)."""
    return t * (_cost(q_out) + _cost(q_in)) <= p * _cost(q_in) + m1 * _cost(q_out)


def rotated_gradients(a: Tensor, g: Tensor, q_out: Basis | None, q_in: Basis | None,
                      per_token: bool | None = None) -> Tensor:
    """Q_Sᵀ DW̄_b Q_A for every sequence b, DW̄_b = Σ_t Ds_t ā_tᵀ: (B, P, M+1) (docs/method.md §3).

    Two associations of the same product, chosen by multiply-add count unless
    ``per_token`` fixes it: rotating every token, Σ_t (Q_Sᵀ Ds_t)(Q_Aᵀ ā_t)ᵀ, costs
    T (Σ p_i² + Σ m_i²) per sequence; rotating the summed gradient, Q_Sᵀ DW̄ Q_A, costs
    P Σ m_i² + (M+1) Σ p_i². Short sequences and wide layers favour the first.
    """
    if per_token is None:
        per_token = rotates_per_token(a.shape[1], q_out, q_in, g.shape[-1], a.shape[-1])
    if per_token:
        if q_in is not None:
            a = q_in.to_basis(a, -1)  # Q_Aᵀ ā_t, (B, T, M+1)
        if q_out is not None:
            g = q_out.to_basis(g, -1)  # Q_Sᵀ Ds_t, (B, T, P)
        return torch.einsum("btp,btm->bpm", g, a)
    dw = torch.einsum("btp,btm->bpm", g, a)  # (B, P, M+1)
    if q_out is not None:
        dw = q_out.to_basis(dw, -2)
    return q_in.to_basis(dw, -1) if q_in is not None else dw


_EIGH_BATCH_BYTES = 1 << 30  # float64 bytes of the factors stacked into one batched call
EIGH_TOLERANCE = 1e-5
"""Largest accepted error of a float32 eigendecomposition (:func:`eigh_batched`); a
factor beyond it is decomposed again in float64."""


def eigh_batched(factors: list[Tensor], precision: str = "auto", consume: bool = False
                 ) -> list[tuple[Tensor, Tensor]]:
    """(Λ, Q) of each symmetric factor, float64 results, on the factors' own device.

    Factors of equal size go to one batched ``torch.linalg.eigh`` (on a GPU; a CPU takes
    them one by one, so only one factor's temporaries exist at a time). With
    ``consume``, each entry of ``factors`` is set to None once decomposed, so a caller
    that handed over its only references holds the factors and bases together for one
    factor at a time, not for all. ``precision``:
    ``"float64"``; ``"float32"`` (faster, on GPUs much faster); ``"auto"`` = float32, then
    a check of each result (:func:`_eigh_errors` ≤ :data:`EIGH_TOLERANCE`), redone in
    float64 where it fails. Eigenvalues are clamped at 0 (the factors are PSD).
    """
    if precision not in ("auto", "float32", "float64"):
        raise DatasleuthError(f"precision must be auto, float32 or float64, not {precision!r}")
    out: list[tuple[Tensor, Tensor]] = [None] * len(factors)  # type: ignore[list-item]
    by_size: dict[int, list[int]] = {}
    for i, c in enumerate(factors):
        by_size.setdefault(c.shape[0], []).append(i)
    limit = _EIGH_BATCH_BYTES if factors and factors[0].device.type != "cpu" else 0
    chunks = [idx[j:j + max(1, limit // (8 * n * n))]  # CPUs gain nothing from batching
              for n, idx in by_size.items()
              for j in range(0, len(idx), max(1, limit // (8 * n * n)))]
    for idx in chunks:  # one batched call per chunk of equal sizes, bounded memory
        c = torch.stack([factors[i] for i in idx]).double()
        if consume:  # the caller's list was the last reference: free each factor now
            for i in idx:
                factors[i] = None  # type: ignore[call-overload]
        c = 0.5 * (c + c.transpose(-1, -2))
        dtype = torch.float64 if precision == "float64" else torch.float32
        lam, q = (x.double() for x in torch.linalg.eigh(c.to(dtype)))
        if precision == "auto":
            bad = _eigh_errors(c, lam, q) > EIGH_TOLERANCE
            if bool(bad.any()):
                lam[bad], q[bad] = torch.linalg.eigh(c[bad])
        for j, i in enumerate(idx):
            out[i] = (lam[j].clamp_min(0.0), q[j].contiguous())  # row-major, as Basis keeps it
    return out


def _eigh_errors(c: Tensor, lam: Tensor, q: Tensor, probes: int = 8) -> Tensor:
    """Per matrix: max of ‖C X − Q Λ Qᵀ X‖ / (‖C‖ ‖X‖) and ‖Qᵀ Q X − X‖ / ‖X‖ on seeded
    random probes X (n × 8), in float64; O(n²) where a full check costs O(n³)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c.shape[-1], probes, generator=g, dtype=torch.float64).to(c.device)
    qx = q.transpose(-1, -2) @ x
    norm = torch.linalg.matrix_norm(x)
    resid = torch.linalg.matrix_norm(c @ x - q @ (lam[..., None] * qx))
    scale = torch.linalg.matrix_norm(c).clamp_min(torch.finfo(torch.float64).tiny)
    ortho = torch.linalg.matrix_norm(q @ qx - x)
    return torch.maximum(resid / (scale * norm), ortho / norm)
