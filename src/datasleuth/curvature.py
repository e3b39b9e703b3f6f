"""Per-layer damped curvature and the one preconditioning path all variants share.

Every variant (identity, diagonal, K-FAC, EK-FAC) is stored the same way: an eigenbasis
of the layer's input side Q_A ((M+1)×(M+1)) and output side Q_S (P×P), possibly
block-diagonal or absent (= the standard basis), and eigenvalues Λ (P×(M+1)) in that
Kronecker basis. The inverse-Hessian-vector product is then (METHOD.md §3;
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

__all__ = ["Basis", "LayerCurvature", "Curvature", "CURVATURES"]

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

    def to(self, device: torch.device | str) -> Basis:
        return Basis([b.to(device) for b in self.blocks])


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

    def inverse_eigenvalues(self, dtype: torch.dtype) -> Tensor:
        """1 / (Λ + λ), (P, M+1)."""
        return 1.0 / (self.eigenvalues.to(dtype) + self.damping)

    def precondition(self, v: Tensor) -> Tensor:
        """(G_ℓ + λ_ℓ I)⁻¹ V for V of shape (..., P, M+1) (METHOD.md §3)."""
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
