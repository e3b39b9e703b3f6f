"""The Gauss-Newton matrix in an index's projected space (docs/method.md §7).

G̃_ℓ = (1/N) Σ_n g̃_n g̃_nᵀ over per-sequence projected pseudo-gradients g̃ (D_ℓ), which is
P G_ℓ Pᵀ for P = P_out ⊗ P_in; (G̃_ℓ + λ_ℓ I)⁻¹ is applied with a Cholesky solve in
float64 (Choe et al. 2024, §3.2). :class:`ProjectedCurvature` is a
:class:`~datasleuth.preconditioner.Preconditioner` whose layer gradients are projected
rows {name: (Q, D_ℓ)}.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from datasleuth.distributed import active, all_reduce_int, all_reduce_sum, rank_seed, world
from datasleuth.errors import DatasleuthError
from datasleuth.layers import TrackedLayer, layers_by_name
from datasleuth.preconditioner import DEFAULT_DAMPING_SCALE, Damping, resolve_damping
from datasleuth.scale.index.config import INDEX_FORMAT_VERSION
from datasleuth.storage import load_tensors, save_tensors
from datasleuth.streaming import BatchEnd, stream
from datasleuth.task import Task

if TYPE_CHECKING:
    from datasleuth.scale.index.store import GradientIndex

__all__ = ["CURVATURE_FILE", "ProjectedCurvature", "Whitened", "fit_projected_curvature"]

CURVATURE_FILE = "curvature.safetensors"


class Whitened:
    """The query preconditioner of a whitened index: none, since its rows carry the
    metric (W g with W² ≈ (G + λI)⁻¹, docs/method.md §11), so queries are projected alike."""

    kind = "whitened"

    def __init__(self, layer_names: list[str]):
        self._names = list(layer_names)
        self.metadata: dict = {"kind": "whitened"}

    @property
    def layer_names(self) -> list[str]:
        return list(self._names)

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        return dict(grads)

    def to(self, device: torch.device | str) -> Whitened:
        return self


class ProjectedCurvature:
    """Damped Gauss-Newton per layer in the projected space, inverted exactly.

    Per layer, either the matrix G̃ (D×D, ``ggn``) or, when fewer sequences than D were
    seen, the scaled rows U (n×D) with G̃ = UᵀU (``rows``); then
    (UᵀU + λI)⁻¹v = (v − Uᵀ(UUᵀ + λI)⁻¹Uv)/λ (Woodbury) and nothing D×D is formed.
    """

    kind = "projected"

    def __init__(self, factors: dict[str, Tensor], damping: dict[str, float], metadata: dict,
                 low_rank: set[str] | frozenset[str] = frozenset()):
        self.factors = factors
        self.damping = damping
        self.metadata = metadata
        self.low_rank = set(low_rank)
        self._chol: dict[str, Tensor] = {}

    @property
    def layer_names(self) -> list[str]:
        return list(self.factors)

    @property
    def ggn(self) -> dict[str, Tensor]:
        """G̃_ℓ per layer, (D_ℓ, D_ℓ) float64 (formed from the rows if low-rank); tests."""
        return {n: f.t() @ f if n in self.low_rank else f for n, f in self.factors.items()}

    def _factor(self, name: str) -> Tensor:
        if name not in self._chol:
            f = self.factors[name].double()
            g = f @ f.t() if name in self.low_rank else f  # UUᵀ (n×n) or G̃ (D×D)
            eye = torch.eye(g.shape[0], dtype=torch.float64)
            self._chol[name] = torch.linalg.cholesky(0.5 * (g + g.t()) + self.damping[name] * eye)
        return self._chol[name]

    def _solve(self, name: str, v: Tensor) -> Tensor:
        """(G̃ + λI)⁻¹ vᵀ for rows v (Q, D), float64 on the CPU -> (Q, D)."""
        chol = self._factor(name)
        if name not in self.low_rank:
            return torch.cholesky_solve(v.t(), chol).t()
        u = self.factors[name].double()
        inner = torch.cholesky_solve(u @ v.t(), chol)  # (n, Q)
        return (v - (u.t() @ inner).t()) / self.damping[name]

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """(G̃_ℓ + λ_ℓ I)⁻¹ applied to projected rows {name: (Q, D_ℓ)}."""
        return {name: self._solve(name, v.double().cpu()).to(v.dtype).to(v.device)
                for name, v in grads.items()}

    def to(self, device: torch.device | str) -> ProjectedCurvature:
        return self  # solved on the CPU in float64; results go back to the rows' device

    def dense(self, name: str) -> Tensor:
        """G̃_ℓ + λ_ℓ I, (D_ℓ, D_ℓ) float64; tests only."""
        g = self.ggn[name].double()
        return g + self.damping[name] * torch.eye(g.shape[0], dtype=torch.float64)

    def save(self, path: str | os.PathLike) -> None:
        meta = dict(self.metadata, damping=self.damping, low_rank=sorted(self.low_rank),
                    format_version=INDEX_FORMAT_VERSION)
        save_tensors(path, {f"{n}/{'rows' if n in self.low_rank else 'ggn'}": f
                            for n, f in self.factors.items()}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProjectedCurvature:
        tensors, meta = load_tensors(path)
        damping = {n: float(d) for n, d in meta.pop("damping").items()}
        low = set(meta.pop("low_rank", []))
        factors = {n: tensors[f"{n}/{'rows' if n in low else 'ggn'}"] for n in damping}
        return cls(factors, damping, meta, low)


class _Accumulator:
    """Per-sequence projected rows kept as rows while fewer than D, else summed as UᵀU."""

    def __init__(self, dim: int, keep_rows: bool):
        self.dim = dim
        self.rows: list[Tensor] | None = [] if keep_rows else None
        self.count = 0
        self.gram: Tensor | None = None if keep_rows else torch.zeros(dim, dim,
                                                                       dtype=torch.float64)

    def add(self, rows: Tensor) -> None:
        self.count += rows.shape[0]
        if self.rows is not None and self.count >= self.dim:  # switch to the D×D sum
            stacked = torch.cat(self.rows) if self.rows else rows[:0]
            self.gram, self.rows = stacked.t() @ stacked, None
        if self.rows is not None:
            self.rows.append(rows)
        else:
            self.gram += rows.t() @ rows

    def result(self, n: int) -> tuple[Tensor, bool]:
        """(U/√n, True) or (Σ g̃g̃ᵀ/n, False)."""
        if self.rows is not None:
            return torch.cat(self.rows) / math.sqrt(n), True
        return self.gram / n, False


def fit_projected_curvature(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    index: GradientIndex,
    *,
    fisher: str = "sampled",
    damping: Damping = None,
    damping_scale: float = DEFAULT_DAMPING_SCALE,
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = True,
) -> ProjectedCurvature:
    """Fit the projected Gauss-Newton of every layer of ``index`` and store it there.

    Streams ``loader`` once, accumulating (1/N) Σ g̃ g̃ᵀ per layer in float64 (or, while
    fewer sequences than D_ℓ were seen, keeping the rows: no D×D matrix) from the
    per-sequence projected pseudo-gradients, with labels sampled from the model
    (``fisher="sampled"``, the true Fisher = Gauss-Newton, docs/method.md §3) or the
    data's own labels (``"empirical"``). Damping λ_ℓ = ``damping_scale`` × mean
    eigenvalue of G̃_ℓ (= trace/D_ℓ) unless ``damping`` gives it (one number, or one per
    layer). Writes ``curvature.safetensors`` into the index directory and attaches the
    result to ``index``.
    """
    if fisher not in ("sampled", "empirical"):
        raise DatasleuthError(f"fisher must be 'sampled' or 'empirical', not {fisher!r}")
    if index.config.whitened:
        raise DatasleuthError(f"{index.directory} is whitened ({index.config.whitening}); its "
                              "queries need no projected curvature: skip this step")
    index.check_model(model)
    layers = layers_by_name(model, index.layer_names)
    sums = {p.name: _Accumulator(p.dim, keep_rows=not active()) for p in index.projections}
    count = [0]

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        sums[layer.name].add(index.features[layer.name](a, g).double().cpu())  # (B, D_ℓ)

    def on_batch(end: BatchEnd) -> None:
        count[0] += end.size

    generator = torch.Generator().manual_seed(rank_seed(seed))
    stream(model, task, loader, layers, on_layer,
           objective="sampled" if fisher == "sampled" else "loglik", on_batch=on_batch,
           generator=generator, max_batches=max_batches, desc="fit projected curvature",
           progress=progress)
    # one loader shard per process (datasleuth.distributed): D×D sums there
    all_reduce_sum([s.gram for s in sums.values() if s.gram is not None])
    count[0] = all_reduce_int(count[0])
    if count[0] == 0:
        raise DatasleuthError("the curvature loader yielded no batches; pass a non-empty loader")
    results = {name: s.result(count[0]) for name, s in sums.items()}
    factors = {name: f for name, (f, _) in results.items()}
    low = {name for name, (_, is_low) in results.items() if is_low}
    damp = {name: resolve_damping(damping, name, _mean_eigenvalue(f, name in low),
                                  damping_scale) for name, f in factors.items()}
    meta = {"fisher": fisher, "seed": seed, "damping_scale": damping_scale,
            "sequences": count[0], "fingerprint": index.fingerprint,
            "config": index.config.to_dict()}
    curvature = ProjectedCurvature(factors, damp, meta, low)
    if world()[0] == 0:  # every process has the same sums; one writes
        curvature.save(index.directory / CURVATURE_FILE)
    index.curvature = curvature
    return curvature


def _mean_eigenvalue(factor: Tensor, low_rank: bool) -> float:
    """trace(G̃)/D from G̃ (D×D) or from U (n×D) with G̃ = UᵀU."""
    if low_rank:
        return float(factor.square().sum() / factor.shape[1])
    return float(torch.diagonal(factor).mean())
