"""Refined inverse-curvature products: EK-FAC as start and preconditioner (docs/method.md §9).

EK-FAC gives x₀ = M⁻¹v ≈ (G + λI)⁻¹v, with M the damped EK-FAC matrix. Refinement
improves x with Gauss-Newton-vector products Gu = (1/N) Σ_n J_nᵀ H_n J_n u
(:class:`~datasleuth.estimators.space.CurvatureOperator`: one ``jvp`` and one ``vjp``
per training example, Schraudolph 2002) on training batches, preconditioned by M:

* ``"cg"``: preconditioned conjugate gradient on (G + λI)x = v started at x₀, with G
  from one fixed (seeded) sample of ``batches`` training batches, or all of them;
* ``"richardson"``: x ← x + α M⁻¹(v − (Ĝ_k + λI)x) with Ĝ_k from fresh batches at
  every step (the stochastic preconditioned Neumann scheme of ASTRA, Wang et al.
  2025); α = 1/μ_max of M⁻¹(G + λI), from power iteration on the fixed sample; with
  sampled batches the answer is the mean of the last half of the iterates (Polyak
  averaging), which damps the noise of the batches.

λ is each layer's EK-FAC damping, so the refined answer solves the very system EK-FAC
approximates. G is restricted to its per-layer blocks G_ℓ by default (the structure
EK-FAC approximates); ``cross_layer=True`` uses the Gauss-Newton matrix of all tracked
layers together. Zero steps return M⁻¹v exactly.

Cost per step and per query vector: one GGN-vector product on the step's batches, i.e.
one ``jvp`` + one ``vjp`` per training example with ``cross_layer``, and L of each
(one per tracked layer) for per-layer blocks. Besides the steps, CG spends one product
on its start residual, Richardson one on the final residual, one on the start residual
and ``power_iterations`` once per preconditioner. :attr:`RefinedInfluence.info`
reports the relative residual ‖v − (G + λI)x‖/‖v‖ per query on the fixed sample.

:class:`RefinedInfluence` is a :class:`~datasleuth.preconditioner.Preconditioner`, so
the scan, query batching and the index use it unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.estimators.space import CurvatureOperator, ParameterSpace, isolated
from datasleuth.layers import layers_by_name
from datasleuth.task import Task

__all__ = ["REFINE_SCHEMES", "RefineConfig", "RefineInfo", "RefinedInfluence"]

REFINE_SCHEMES = ("cg", "richardson")
_VECTORS = 8  # query vectors pushed through the model at once


@dataclass(frozen=True)
class RefineConfig:
    """How the EK-FAC solution is refined (module docstring).

    Attributes:
        steps: refinement steps (0: EK-FAC exactly).
        scheme: ``"cg"`` (preconditioned CG) or ``"richardson"`` (ASTRA's stochastic
            preconditioned Neumann steps).
        batches: training batches per GGN-vector product, sampled with ``seed``;
            ``None`` = every batch (CG and the residual then use the exact G).
        cross_layer: use the Gauss-Newton matrix across the tracked layers, not its
            per-layer blocks.
        step_size: Richardson's α; ``None`` = 1/μ_max of M⁻¹(G + λI).
        power_iterations: products spent estimating μ_max (Richardson only).
        seed: seed of the batch sampler.
    """

    steps: int = 10
    scheme: str = "cg"
    batches: int | None = None
    cross_layer: bool = False
    step_size: float | None = None
    power_iterations: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise DatasleuthError(f"refine steps must be an integer >= 0, got {self.steps!r}; "
                                  "use e.g. 10")
        if self.scheme not in REFINE_SCHEMES:
            raise DatasleuthError(f"unknown refine scheme {self.scheme!r}; choose one of "
                                  f"{', '.join(REFINE_SCHEMES)}")
        if self.batches is not None and self.batches < 1:
            raise DatasleuthError("refine batches must be >= 1, or None for every batch")
        if self.step_size is not None and not self.step_size > 0:
            raise DatasleuthError(f"step_size must be > 0, got {self.step_size}; leave it "
                                  "None to take it from the preconditioned spectrum")
        if self.power_iterations < 1:
            raise DatasleuthError("power_iterations must be >= 1; use e.g. 10")


@dataclass
class RefineInfo:
    """What refinement did, over every query vector it has solved so far (in order)."""

    steps: int
    scheme: str
    products: int = 0  # GGN-vector products per query vector (module docstring)
    step_size: float | None = None
    start: list[float] = field(default_factory=list)  # EK-FAC's relative residual
    residual: list[float] = field(default_factory=list)  # the refined relative residual

    def summary(self) -> dict[str, Any]:
        """JSON-ready: settings, products, and the residuals per query."""
        worst = max(self.residual) if self.residual else None
        return {**asdict(self), "max_residual": worst}


class RefinedInfluence:
    """(G + λI)⁻¹ by EK-FAC-preconditioned refinement (module docstring); a Preconditioner.

    ``train``: a sequence of training batches (indexable, for sampling) in the task's
    format. ``precondition`` solves each call's query gradients together (in chunks of
    a few vectors) and remembers each distinct query's answer, so a query preconditioned
    twice (query batching rescoring) costs one solve.
    """

    def __init__(self, model: nn.Module, task: Task, curvature: Curvature,
                 train: Sequence[Any], config: RefineConfig | None = None):
        if not curvature.layer_names:
            raise DatasleuthError("the curvature has no layers; fit it on the tracked layers")
        if len(train) == 0:
            raise DatasleuthError("refinement needs training batches; give a non-empty list")
        self.model, self.task, self.train = model, task, train
        self.config = config or RefineConfig()
        self.base = curvature
        self.kind = f"{curvature.kind}+{self.config.scheme}"
        self.space = ParameterSpace(model, layers_by_name(model, curvature.layer_names))
        self.layout = self.space.layout
        self.info = RefineInfo(self.config.steps, self.config.scheme)
        self._operator: CurvatureOperator | None = None
        self._fixed: list[Any] | None = None
        self._solved: dict[str, tuple[Tensor, float, float]] = {}

    @property
    def layer_names(self) -> list[str]:
        return list(self.layout.names)

    @property
    def metadata(self) -> dict[str, Any]:
        """The base curvature's metadata, its ``config`` extended by the refinement's."""
        meta = dict(self.base.metadata)
        meta["config"] = {**meta.get("config", {}), "refine": asdict(self.config)}
        return meta

    def to(self, device: torch.device | str) -> RefinedInfluence:
        """Itself: it works where the model is (the curvature follows the model)."""
        return self

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Refined (G + λI)⁻¹ applied jointly over layers to {name: (B, P, M+1)}."""
        flat = self.layout.flatten(grads)  # (B, D)
        keys = [hashlib.sha1(row.detach().cpu().double().numpy().tobytes()).hexdigest()
                for row in flat]
        todo = [i for i, k in enumerate(keys) if k not in self._solved]
        if todo:
            with isolated(self.model):
                x, start, end = self._solve(flat[todo])
            for j, i in enumerate(todo):
                if keys[i] not in self._solved:
                    self.info.start.append(float(start[j]))
                    self.info.residual.append(float(end[j]))
                self._solved[keys[i]] = (x[j].detach(), float(start[j]), float(end[j]))
        out = torch.stack([self._solved[k][0] for k in keys]).to(flat.dtype)  # (B, D)
        return self.layout.unflatten(out)

    def solve(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x (B, D), start residual (B,), final residual (B,)) for rows of ``v`` (B, D)."""
        with isolated(self.model):
            return self._solve(v)

    # -- the solve ---------------------------------------------------------------------

    def _setup(self, dtype: torch.dtype) -> CurvatureOperator:
        if self._operator is None:
            lam = self.space.damping("match", self.base)  # (D,), EK-FAC's λ_ℓ
            self._operator = CurvatureOperator(self.space, self.task, lam,
                                               not self.config.cross_layer)
            self._generator = torch.Generator().manual_seed(self.config.seed)
            self._fixed = self._sample()
            self._curvature = self.base.to(lam.device)
        return self._operator

    def _sample(self) -> list[Any]:
        """``config.batches`` training batches drawn without replacement, or all of them."""
        n, k = len(self.train), self.config.batches
        if k is None or k >= n:
            return list(self.train)
        idx = torch.randperm(n, generator=self._generator)[:k]
        return [self.train[int(i)] for i in idx]

    def _apply(self, batches: list[Any], x: Tensor) -> Tensor:
        """(G_batches + λI) x for rows of ``x`` (K, D), a few vectors at a time."""
        op = self._setup(x.dtype)
        if x.shape[0] == 0:
            return x.clone()
        return torch.cat([op.mean(batches, x[s:s + _VECTORS])
                          for s in range(0, x.shape[0], _VECTORS)])

    def _ekfac(self, r: Tensor) -> Tensor:
        """M⁻¹ r for rows of ``r`` (K, D): EK-FAC layer by layer (docs/method.md §3)."""
        grads = self.layout.unflatten(r)
        return self.layout.flatten(self._curvature.precondition(grads))

    def _solve(self, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        op = self._setup(v.dtype)
        b = v.to(op.damping.dtype)  # (B, D)
        norm = b.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)  # (B,)
        x = self._ekfac(b)  # x₀ = M⁻¹v, (B, D)
        if self.config.scheme == "cg":
            x, r = _pcg(lambda u: self._apply(self._fixed, u), self._ekfac, b, x,
                        self.config.steps)
            self.info.products = self.config.steps + 1
            start, end = r
        else:
            x, start, end = self._richardson(b, x)
        return x.to(v.dtype), start / norm, end / norm

    def _richardson(self, b: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x ← x + α M⁻¹(v − (Ĝ_k + λI)x), fresh batches Ĝ_k per step (ASTRA)."""
        alpha = self._step_size(b)
        start = (b - self._apply(self._fixed, x)).norm(dim=1)  # (B,)
        sampled, tail = self.config.batches is not None, self.config.steps // 2
        mean, count = torch.zeros_like(x), 0
        for step in range(self.config.steps):
            batches = self._sample() if sampled else self._fixed
            x = x + alpha * self._ekfac(b - self._apply(batches, x))
            if sampled and step >= tail:  # average the last half: damps the batch noise
                mean, count = mean + x, count + 1
        x = mean / count if count else x
        end = (b - self._apply(self._fixed, x)).norm(dim=1) if self.config.steps else start
        self.info.products = self.config.steps + 1 + (1 if self.config.steps else 0)
        return x, start, end

    def _step_size(self, b: Tensor) -> float:
        """α = 1/μ_max of M⁻¹(G + λI) on the fixed sample, by power iteration (cached)."""
        if self.config.step_size is not None:
            return self.config.step_size
        if self.info.step_size is None:
            g = torch.Generator().manual_seed(self.config.seed)
            y = torch.randn(1, b.shape[1], generator=g, dtype=b.dtype).to(b.device)  # (1, D)
            u = self._ekfac(y)
            mu = 1.0
            for _ in range(self.config.power_iterations):
                ay = self._apply(self._fixed, u)
                mu = float((u * ay).sum() / (u * y).sum())  # Rayleigh quotient in M's norm
                y = ay / ay.norm()
                u = self._ekfac(y)
            self.info.step_size = 1.0 / max(mu, 1e-12)
        return self.info.step_size


def _pcg(apply: Callable[[Tensor], Tensor], inverse: Callable[[Tensor], Tensor], b: Tensor,
         x: Tensor, steps: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Preconditioned CG on every row of ``b`` (B, D) from ``x``, ``steps`` iterations.

    Returns x and the (B,) residual norms at the start and the end (the recursion's r,
    which equals b − Ax up to rounding). Rows whose residual vanishes stop early.
    """
    r = b - apply(x)  # (B, D)
    start = r.norm(dim=1)
    floor = 4 * torch.finfo(b.dtype).eps * b.norm(dim=1)  # (B,) residual that is rounding
    z = inverse(r)
    p = z.clone()
    rz = (r * z).sum(1)  # (B,)
    for _ in range(steps):
        active = (r.norm(dim=1) > floor) & (rz > 0)
        if not bool(active.any()):
            break
        ap = torch.zeros_like(p)
        ap[active] = apply(p[active])
        pap = (p * ap).sum(1)
        alpha = torch.where(active, rz / pap.where(active, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        z = inverse(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(active, rz_new / rz.where(active, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x, (start, r.norm(dim=1))
