"""Iterative references: conjugate gradient and LiSSA on GGN-vector products.

docs/method.md §7. Neither forms G: each applies it to vectors with one jvp and one
vjp per example (Schraudolph 2002), so memory stays O(Q·D) for Q query vectors, while
the work grows with the number of passes over the data the solve needs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.estimators.space import (
    CHUNK,
    CurvatureOperator,
    JointPreconditioner,
    ParameterSpace,
    ReferenceDamping,
    isolated,
)
from datasleuth.layers import TrackedLayer
from datasleuth.preconditioner import DEFAULT_DAMPING_SCALE
from datasleuth.task import Task

__all__ = ["CGInfo", "ConjugateGradient", "LiSSA", "LiSSAInfo"]

Layers = Sequence[str] | Sequence[TrackedLayer] | None
_Self = TypeVar("_Self", bound="_Iterative")


class _Iterative(JointPreconditioner):
    """What CG and LiSSA share: the model, its parameter space and the damped operator."""

    def __init__(self, model: nn.Module, task: Task, layers: Layers,
                 damping: ReferenceDamping, reference: Curvature | None, block_diagonal: bool,
                 damping_scale: float = DEFAULT_DAMPING_SCALE):
        self.model, self.task = model, task
        self.space = ParameterSpace.resolve(model, layers, reference)
        self.layout = self.space.layout
        self.damping, self.reference = damping, reference
        self.block_diagonal = block_diagonal
        self.damping_scale = damping_scale
        self._means: dict[str, float] | None = None

    def to(self: _Self, device: torch.device | str) -> _Self:
        """Itself: it works wherever the model lives."""
        return self

    def _operator(self, batches: Iterable[Any]) -> CurvatureOperator:
        """The damped operator; ``damping=None`` takes ``damping_scale`` × each layer's
        mean eigenvalue, estimated once on ``batches`` (:meth:`CurvatureOperator.layer_means`)."""
        if self.damping is None and self._means is None:
            probe = CurvatureOperator(self.space, self.task, self.space.damping(0.0, None),
                                      self.block_diagonal)
            self._means = probe.layer_means(batches)
        lam = self.space.damping(self.damping, self.reference, self._means,
                                 self.damping_scale)  # (D,)
        return CurvatureOperator(self.space, self.task, lam, self.block_diagonal)


@dataclass
class CGInfo:
    """How the last :meth:`ConjugateGradient.precondition` call went."""

    iterations: int
    residual: Tensor  # (B,) relative residual ‖v − (G + λ)x‖ / ‖v‖, recomputed at the end
    converged: bool


class ConjugateGradient(_Iterative):
    """(G + λI)⁻¹v by conjugate gradient with Gauss-Newton-vector products (docs/method.md §7).

    Each iteration streams ``train`` once (it must be re-iterable: a DataLoader or a
    list of batches) and applies G to every still-unconverged query vector at once:
    Jv by ``torch.func.jvp``, then Jᵀ H (Jv) by ``torch.func.vjp`` (Schraudolph 2002).
    Stops when each query's relative residual is below ``tol`` or after ``max_iter``
    iterations; :attr:`info` reports the iterations and residuals. In exact arithmetic CG
    needs at most D iterations; convergence speed depends on the condition number
    (λ_max + λ)/λ.
    """

    kind = "cg"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Iterable[Any],
        layers: Layers = None,
        *,
        damping: ReferenceDamping = None,
        reference: Curvature | None = None,
        block_diagonal: bool = False,
        tol: float = 1e-10,
        max_iter: int = 1000,
        damping_scale: float = DEFAULT_DAMPING_SCALE,
    ):
        if not tol > 0 or max_iter < 1:
            raise DatasleuthError("tol must be > 0 and max_iter >= 1; use e.g. tol=1e-10")
        super().__init__(model, task, layers, damping, reference, block_diagonal, damping_scale)
        self.train, self.tol, self.max_iter = train, tol, max_iter
        self.info: CGInfo | None = None

    def solve(self, v: Tensor) -> Tensor:
        """x with (G + λI) x = v for each row of ``v`` (B, D)."""
        with isolated(self.model):
            op = self._operator(self.train)
            b = v.to(op.damping.dtype)  # (B, D)

            def apply(x: Tensor) -> Tensor:
                return op.mean(self.train, x)

            x, iterations, active = _conjugate_gradient(apply, b, self.tol, self.max_iter)
            residual = _relative_residual(b, apply(x))  # (B,)
        self.info = CGInfo(iterations, residual, not bool(active.any()))
        return x.to(v.dtype)


def _conjugate_gradient(
    apply: Callable[[Tensor], Tensor], b: Tensor, tol: float, max_iter: int
) -> tuple[Tensor, int, Tensor]:
    """CG on every row of ``b`` (B, D) at once, applying A only to unconverged rows.

    Returns x (B, D), the iterations run and the (B,) mask of rows still unconverged.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(1)  # (B,)
    bnorm = b.norm(dim=1)  # (B,)
    active = rs.sqrt() > tol * bnorm
    it = 0
    while bool(active.any()) and it < max_iter:
        ap = torch.zeros_like(p)
        ap[active] = apply(p[active])
        alpha = torch.where(active, rs / (p * ap).sum(1).where(active, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        beta = torch.where(active, rs_new / rs.where(active, 1.0), 0.0)
        p = r + beta[:, None] * p
        rs = rs_new
        active = active & (rs.sqrt() > tol * bnorm)
        it += 1
    return x, it, active


@dataclass
class LiSSAInfo:
    """How the last :meth:`LiSSA.precondition` call went."""

    scale: float  # α
    depth: int
    repeats: int
    spread: Tensor  # (B,) relative standard deviation of the estimate across repeats
    residual: Tensor | None = None  # (B,) ‖v − (G + λ)x‖/‖v‖ on the full data (warn_residual)


class LiSSA(_Iterative):
    """(G + λI)⁻¹v by the LiSSA recursion (Agarwal et al. 2017; Koh & Liang 2017; method §7).

        r_0 = v,   r_j = v + (I − α(Ĝ_j + λI)) r_{j−1},   estimate α r_J,

    with Ĝ_j the GGN of a mini-batch of ``batch_size`` examples drawn uniformly without
    replacement (seeded), averaged over ``repeats`` independent recursions. The fixed
    point is r = (α(G + λI))⁻¹ v, so α r_J → (G + λI)⁻¹ v; the error of the undamped
    directions shrinks like (1 − αλ)^J. The recursion converges when every step is a
    contraction, α < 2/(λ_max(Ĝ) + λ); α < 1/(λ_max + λ) makes it monotone. With
    ``scale=None``, α = 1 / (2 (λ_max + λ_max(damping))) with λ_max of the full-data
    GGN from ``power_iterations`` steps of power iteration — the factor 2 leaves room for
    mini-batches whose curvature exceeds the full data's; pass a smaller ``scale`` if the
    recursion diverges. ``batch_size=None`` uses the full data at every step
    (deterministic: a truncated Neumann series). After the recursion one more pass over
    the data measures the relative residual ‖v − (G + λI)x‖/‖v‖ (:attr:`info`); above
    ``warn_residual`` a RuntimeWarning says the estimate has not converged
    (``warn_residual=None`` skips the check and its pass).

    ``train`` is a map-style dataset or a DataLoader over one (its dataset and
    collate_fn are used).
    """

    kind = "lissa"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        train: Any,
        layers: Layers = None,
        *,
        damping: ReferenceDamping = None,
        reference: Curvature | None = None,
        block_diagonal: bool = False,
        depth: int = 1000,
        repeats: int = 1,
        batch_size: int | None = None,
        scale: float | None = None,
        seed: int = 0,
        power_iterations: int = 30,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        damping_scale: float = DEFAULT_DAMPING_SCALE,
        warn_residual: float | None = 0.1,
    ):
        if depth < 1 or repeats < 1 or (batch_size is not None and batch_size < 1):
            raise DatasleuthError("depth, repeats and batch_size must be >= 1; use e.g. "
                                  "depth=1000, repeats=4, batch_size=64")
        if scale is not None and not scale > 0:
            raise DatasleuthError(f"scale must be > 0, got {scale}; leave it None to choose")
        if isinstance(train, DataLoader):
            collate_fn = collate_fn or train.collate_fn
            train = train.dataset
        if not (hasattr(train, "__getitem__") and hasattr(train, "__len__")):
            raise DatasleuthError("LiSSA samples mini-batches: pass a map-style dataset (with "
                                  "__getitem__ and __len__) or a DataLoader over one")
        super().__init__(model, task, layers, damping, reference, block_diagonal, damping_scale)
        self.warn_residual = warn_residual
        self.dataset, self.collate = train, collate_fn or default_collate
        self.depth, self.repeats, self.batch_size = depth, repeats, batch_size
        self.scale, self.seed, self.power_iterations = scale, seed, power_iterations
        self.info: LiSSAInfo | None = None

    def _full(self) -> list[Any]:
        n = len(self.dataset)
        return [self.collate([self.dataset[i] for i in range(s, min(s + CHUNK, n))])
                for s in range(0, n, CHUNK)]

    def _sample(self, generator: torch.Generator) -> list[Any]:
        n = len(self.dataset)
        idx = torch.randperm(n, generator=generator)[: min(self.batch_size or n, n)]
        return [self.collate([self.dataset[int(i)] for i in idx])]

    def _largest_eigenvalue(self, op: CurvatureOperator, full: list[Any]) -> float:
        """λ_max of the full-data GGN by power iteration (a slight underestimate)."""
        g = torch.Generator().manual_seed(self.seed)
        v = torch.randn(1, self.space.dim, generator=g, dtype=op.damping.dtype).to(op.device)
        lam = 0.0
        for _ in range(self.power_iterations):
            v = v / v.norm()
            w, count = op.curvature(full, v)  # (1, D)
            lam = float((v * w).sum()) / count
            if not lam > 0:
                break
            v = w
        return lam

    def _recursion(self, op: CurvatureOperator, b: Tensor, alpha: float,
                   full: list[Any], generator: torch.Generator) -> Tensor:
        """α r_J of one recursion for every row of ``b`` (B, D)."""
        r = b.clone()
        for _ in range(self.depth):
            batches = full if self.batch_size is None else self._sample(generator)
            r = b + r - alpha * op.mean(batches, r)
        if not bool(torch.isfinite(r).all()):
            raise DatasleuthError(f"LiSSA diverged with scale {alpha:.3g}; pass a smaller "
                                  "scale or a larger batch_size")
        return alpha * r

    def solve(self, v: Tensor) -> Tensor:
        """Estimate of (G + λI)⁻¹ v for each row of ``v`` (B, D)."""
        full = self._full()
        with isolated(self.model):
            op = self._operator(full)
            b = v.to(op.damping.dtype)  # (B, D)
            alpha = self.scale if self.scale is not None else 1.0 / (
                2.0 * (self._largest_eigenvalue(op, full) + float(op.damping.max())))
            generator = torch.Generator().manual_seed(self.seed)
            est = torch.stack([self._recursion(op, b, alpha, full, generator)
                               for _ in range(self.repeats)])  # (R, B, D)
            mean = est.mean(0)  # (B, D)
            residual = None
            if self.warn_residual is not None:  # one more pass over the data
                residual = _relative_residual(b, op.mean(full, mean))  # (B,)
        tiny = torch.finfo(mean.dtype).tiny
        spread = est.std(0, correction=0).norm(dim=1) / mean.norm(dim=1).clamp_min(tiny)
        self.info = LiSSAInfo(alpha, self.depth, self.repeats, spread, residual)
        if residual is not None and float(residual.max()) > self.warn_residual:
            warnings.warn(f"LiSSA has not converged: relative residual up to "
                          f"{float(residual.max()):.3g} (> {self.warn_residual}); raise depth "
                          "(the error shrinks like (1 - scale*damping)^depth) or the damping, "
                          "or use ConjugateGradient", RuntimeWarning, stacklevel=2)
        return mean.to(v.dtype)


def _relative_residual(b: Tensor, applied: Tensor) -> Tensor:
    """‖b − Ax‖ / ‖b‖ per row, (B,), from ``applied`` = Ax."""
    return (b - applied).norm(dim=1) / b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
