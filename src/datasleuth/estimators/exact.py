"""The exact reference: the dense damped GGN or Hessian, solved by Cholesky.

docs/method.md §7; the cost table is in :mod:`datasleuth.estimators`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.estimators.space import (
    CurvatureOperator,
    GradientLayout,
    JointPreconditioner,
    ParameterSpace,
    ReferenceDamping,
    isolated,
)
from datasleuth.layers import TrackedLayer
from datasleuth.preconditioner import DEFAULT_DAMPING_SCALE
from datasleuth.task import Task

__all__ = ["EXACT_KINDS", "ExactInfluence"]

EXACT_KINDS = ("exact_ggn", "exact_hessian")
_NEGATIVE = ("raise", "clip", "abs")


class ExactInfluence(JointPreconditioner):
    """Dense damped GGN or Hessian over all tracked parameters, solved by Cholesky.

    Build it with :meth:`fit`. ``kind="exact_ggn"`` uses G = (1/N) Σ_n J_nᵀ H_n J_n
    (docs/method.md §1, §7); ``kind="exact_hessian"`` the Hessian of the mean training
    loss (1/N) Σ_n ∇²L_n (Koh & Liang 2017, Eq. 2). The Hessian of a non-convex model is
    indefinite: ``negative`` decides what happens to its negative eigenvalues before
    damping — ``"raise"`` keeps the spectrum and refuses (G + λ) that is not positive
    definite (Koh & Liang's remedy: raise the damping), ``"clip"`` sets them to 0,
    ``"abs"`` flips their sign (the saddle-free Newton choice, Dauphin et al. 2014).

    Cost: O(D²) memory, D curvature-vector products per example (O(N·D·K) for K model
    outputs) to build the matrix, O(D³) to factor it — a reference for D up to ~10⁴.
    The constructor factors G + diag(λ) once; :meth:`to` moves the factor.
    """

    def __init__(self, layout: GradientLayout, matrix: Tensor, damping: Tensor, kind: str,
                 block_diagonal: bool = False):
        _check_choice("kind", kind, EXACT_KINDS)
        self.kind = kind
        self.layout = layout
        self.matrix = matrix  # (D, D), undamped, after block masking and spectrum handling
        self.damping = damping  # (D,)
        self.block_diagonal = block_diagonal
        damped = self.dense()
        self._chol, info = torch.linalg.cholesky_ex(0.5 * (damped + damped.t()))  # (D, D)
        if int(info) != 0:
            low = float(torch.linalg.eigvalsh(damped)[0])
            raise DatasleuthError(
                f"the damped {kind[6:]} is not positive definite (smallest eigenvalue "
                f"{low:.3g}); raise the damping above {max(-low, 0):.3g} or pass "
                "negative='clip' or 'abs'"
            )

    @classmethod
    def fit(
        cls,
        model: nn.Module,
        task: Task,
        loader: Iterable[Any],
        layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
        *,
        kind: str = "exact_ggn",
        damping: ReferenceDamping = None,
        reference: Curvature | None = None,
        block_diagonal: bool = False,
        negative: str = "raise",
        damping_scale: float = DEFAULT_DAMPING_SCALE,
    ) -> ExactInfluence:
        """Build the dense matrix from ``loader`` (iterated once) and factor it, once.

        ``layers``: tracked layers, glob patterns, or None for every supported layer;
        with ``damping="match"`` and no ``layers``, the reference curvature's layers.
        ``damping=None``: ``damping_scale`` × the mean eigenvalue tr(G_ℓ)/D_ℓ of each
        layer's block, EK-FAC's rule (:func:`~datasleuth.preconditioner.resolve_damping`).
        """
        _check_choice("kind", kind, EXACT_KINDS)
        _check_choice("negative", negative, _NEGATIVE)
        space = ParameterSpace.resolve(model, layers, reference)
        op = CurvatureOperator(space, task, space.damping(0.0, None), block_diagonal,
                               "ggn" if kind == "exact_ggn" else "hessian")  # λ unused here
        with isolated(model):
            total, count = op.dense(list(loader))  # (D, D)
        if count == 0:
            raise DatasleuthError("the loader yielded no examples; give a non-empty loader")
        matrix = total.double() / count  # float64 for the solve
        matrix = 0.5 * (matrix + matrix.t())
        if kind == "exact_hessian" and negative != "raise":
            matrix = _fix_spectrum(matrix, negative)
        means = space.layout.layer_means(torch.diagonal(matrix)) if damping is None else None
        lam = space.damping(damping, reference, means, damping_scale)  # (D,)
        return cls(space.layout, matrix, lam.double(), kind, block_diagonal)

    def dense(self) -> Tensor:
        """The damped matrix G + diag(λ), (D, D)."""
        return self.matrix + torch.diag(self.damping)

    def solve(self, v: Tensor) -> Tensor:
        """x with (G + λI) x = v for each row of ``v`` (B, D), from the Cholesky factor."""
        sol = torch.cholesky_solve(v.t().to(self._chol.dtype), self._chol).t()  # (B, D)
        return sol.to(v.dtype)

    def to(self, device: torch.device | str) -> ExactInfluence:
        """This estimator with its matrix and factor on ``device`` (no refactoring)."""
        moved = copy.copy(self)
        moved.matrix, moved.damping, moved._chol = (
            t.to(device) for t in (self.matrix, self.damping, self._chol))
        return moved


def _fix_spectrum(matrix: Tensor, negative: str) -> Tensor:
    """``matrix`` (D, D) with negative eigenvalues set to 0 (clip) or flipped (abs)."""
    evals, evecs = torch.linalg.eigh(matrix)
    evals = evals.clamp_min(0.0) if negative == "clip" else evals.abs()
    return (evecs * evals) @ evecs.t()


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise DatasleuthError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
