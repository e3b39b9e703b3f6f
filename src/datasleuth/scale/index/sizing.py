"""Projection sizes chosen from the fitted curvature (docs/method.md §11).

The effective dimension of a layer's damped curvature, d_λ = Σ_i σ_i/(σ_i + λ) over its
(EK-FAC) eigenvalues σ_i, counts the directions the influence metric does not damp away.
A random sketch of size k preserves (G + λI)⁻¹ inner products to relative distortion ε
once k ≳ d_λ/ε² (Hu et al. 2026, arXiv 2602.10449, Thm. on sketched influence; we take the
constant as 1). :func:`auto_dims` spends a byte budget per sequence over the layers in
proportion to their effective dimensions, never beyond what theory asks for or the
layer's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from datasleuth.curvature import Curvature, LayerCurvature
from datasleuth.errors import DatasleuthError
from datasleuth.layers import TrackedLayer
from datasleuth.scale.index.codec import numbers_within
from datasleuth.scale.index.config import IndexConfig

__all__ = ["DEFAULT_DISTORTION", "NOISE", "auto_config", "auto_dims", "choose_storage",
           "effective_dimension", "size_report"]

DEFAULT_DISTORTION = 0.25


def effective_dimension(layer: LayerCurvature) -> float:
    """d_λ = Σ σ/(σ + λ) over the layer's eigenvalues (P×(M+1)) and its damping λ."""
    sigma = layer.eigenvalues.double().clamp_min(0)
    return float((sigma / (sigma + layer.damping)).sum())


def size_report(layers: Sequence[TrackedLayer], curvature: Curvature,
                distortion: float = DEFAULT_DISTORTION) -> dict[str, dict[str, Any]]:
    """Per layer: effective dimension, layer size P·(M+1), and the sketch size d_λ/ε²."""
    if not 0 < distortion < 1:
        raise DatasleuthError(f"distortion must be in (0, 1), got {distortion!r}")
    out = {}
    for layer in layers:
        if layer.name not in curvature.layers:
            raise DatasleuthError(f"the curvature lacks layer {layer.name}; fit it on the "
                                  "layers the index tracks")
        d_eff = effective_dimension(curvature.layers[layer.name])
        size = layer.grad_shape[0] * layer.grad_shape[1]
        out[layer.name] = {"effective_dimension": round(d_eff, 3), "size": size,
                           "distortion": distortion,
                           "theory_dim": min(size, math.ceil(d_eff / distortion**2))}
    return out


def _sides(total: int, p: int, m: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out·k_in ≤ total, as square as the layer allows."""
    k_in = max(1, min(m, math.isqrt(max(total, 1))))
    k_out = max(1, min(p, total // k_in))
    k_in = max(1, min(m, total // k_out))
    return k_out, k_in


def _energies(layers: Sequence[TrackedLayer], curvature: Curvature) -> dict[str, Tensor]:
    """Λ/(Λ+λ) of every EK-FAC eigen-coordinate, per layer: each one's expected share of a
    whitened training gradient's squared norm."""
    energy = {}
    for layer in layers:
        c = curvature.layers[layer.name]
        sigma = c.eigenvalues.double().clamp_min(0).reshape(-1)
        energy[layer.name] = sigma / (sigma + c.damping)
    return energy


def _eigen_counts(layers: Sequence[TrackedLayer], curvature: Curvature, budget: int,
                  want: dict[str, int], energy: dict[str, Tensor] | None = None
                  ) -> dict[str, int]:
    """Coordinates per layer when the ``budget`` highest Λ/(Λ+λ) over all layers are kept."""
    energy = energy or _energies(layers, curvature)
    every = torch.cat(list(energy.values()))
    cut = float(torch.topk(every, min(budget, len(every))).values[-1])
    return {n: max(1, min(int((e >= cut).sum()), want[n])) for n, e in energy.items()}


def auto_dims(layers: Sequence[TrackedLayer], curvature: Curvature, bytes_per_sequence: int,
              dtype: str = "float16", distortion: float = DEFAULT_DISTORTION,
              projection: str = "gaussian"
              ) -> tuple[dict[str, int], dict[str, int], dict[str, dict[str, Any]]]:
    """(k_out per layer, k_in per layer, report) within ``bytes_per_sequence``.

    Each layer gets numbers in proportion to its effective dimension, capped at the
    theory's size (d_λ/ε²); leftover budget is not spent (it would buy no accuracy the
    bound promises). With ``projection="eigen"`` the budget goes to the eigen-coordinates
    of highest Λ/(Λ+λ) over all layers together (same cap). The report is
    :func:`size_report` plus the chosen ``k_out``, ``k_in`` and ``dim``.
    """
    if not (isinstance(bytes_per_sequence, int) and bytes_per_sequence >= 1):
        raise DatasleuthError(f"bytes_per_sequence must be a positive integer, got "
                              f"{bytes_per_sequence!r}")
    report = size_report(layers, curvature, distortion)
    budget = numbers_within(bytes_per_sequence, dtype, len(layers))
    if budget < len(layers):
        raise DatasleuthError(f"{bytes_per_sequence} bytes per sequence hold fewer than one "
                              f"{dtype} number per layer; raise --bytes-per-sequence")
    want = {n: r["theory_dim"] for n, r in report.items()}
    if projection == "eigen":
        return _eigen_dims(layers, _eigen_counts(layers, curvature, budget, want), report)
    weights = {n: max(r["effective_dimension"], 1.0) for n, r in report.items()}
    grant = dict.fromkeys(want, 0)
    left, open_ = budget, set(want)
    while open_ and left >= len(open_):  # water-filling: cap at the theory's size
        total_w = sum(weights[n] for n in open_)
        share = {n: max(1, int(left * weights[n] / total_w)) for n in open_}
        for n in sorted(open_):
            grant[n] += min(share[n], want[n] - grant[n])
        left = budget - sum(grant.values())
        done = {n for n in open_ if grant[n] >= want[n]}
        if not done:
            break
        open_ -= done
    k_out, k_in = {}, {}
    for layer in layers:
        p, m = layer.grad_shape
        k_out[layer.name], k_in[layer.name] = _sides(max(1, grant[layer.name]), p, m)
        report[layer.name].update(k_out=k_out[layer.name], k_in=k_in[layer.name],
                                  dim=k_out[layer.name] * k_in[layer.name])
    return k_out, k_in, report


def _eigen_dims(layers: Sequence[TrackedLayer], counts: dict[str, int],
                report: dict[str, dict[str, Any]]
                ) -> tuple[dict[str, int], dict[str, int], dict[str, dict[str, Any]]]:
    """(k_out, k_in) with k_out·k_in ≤ count (only the product matters for a selection)."""
    k_out, k_in = {}, {}
    for layer in layers:
        c, p = counts[layer.name], layer.grad_shape[0]
        k_in[layer.name] = max(1, math.ceil(c / p))  # k_out·k_in > c − k_in
        k_out[layer.name] = max(1, min(p, c // k_in[layer.name]))
        report[layer.name].update(k_out=k_out[layer.name], k_in=k_in[layer.name],
                                  dim=k_out[layer.name] * k_in[layer.name])
    return k_out, k_in, report


NOISE = {"int8": 1e-4, "int4": 0.01, "int2": 0.1175, "int1": 1 - 2 / math.pi}
"""Relative squared error of each quantised storage on Gaussian numbers (:mod:`.codec`:
uniform 8 and 4 bits at the slice's maximum, about; Max's four levels; the sign)."""


def _top_sum(e: Tensor, k: int) -> float:
    """Sum of the k largest entries of e: one sort-free topk of k only."""
    return float(e.sum()) if k >= len(e) else float(torch.topk(e, k, sorted=False).values.sum())


def choose_storage(layers: Sequence[TrackedLayer], curvature: Curvature,
                   bytes_per_sequence: int, distortion: float = DEFAULT_DISTORTION
                   ) -> tuple[str, dict[str, float]]:
    """The quantised storage of EK-FAC eigen-coordinate rows that keeps the most whitened
    energy within ``bytes_per_sequence``, and each candidate's figure.

    At b bits the budget holds 8/b times the coordinates of a byte each; keeping the
    highest Λ/(Λ+λ) of them captures a fraction E_b of the expected whitened energy,
    and rounding keeps a fraction 1 − ν_b of it (:data:`NOISE`). The choice maximises
    E_b (1 − ν_b): fewer bits while more coordinates still add energy, more bits once
    every coordinate worth keeping fits. A rough model: on the README's benchmark it
    ranks int1 > int2 > int4 at 16 KiB, as measured.
    """
    report = size_report(layers, curvature, distortion)
    want = {n: r["theory_dim"] for n, r in report.items()}
    energy = _energies(layers, curvature)
    total = float(sum(float(e.sum()) for e in energy.values())) or 1.0
    figures = {}
    for dtype, noise in NOISE.items():
        budget = numbers_within(bytes_per_sequence, dtype, len(layers))
        if budget < len(layers):
            continue
        counts = _eigen_counts(layers, curvature, budget, want, energy)
        kept = sum(_top_sum(energy[n], counts[n]) for n in counts)
        figures[dtype] = kept / total * (1 - noise)
    if not figures:
        raise DatasleuthError(f"{bytes_per_sequence} bytes per sequence hold fewer than one "
                              "number per layer; raise --bytes-per-sequence")
    return max(figures, key=lambda d: figures[d]), figures


def auto_config(config: IndexConfig, layers: Sequence[TrackedLayer], curvature: Curvature,
                bytes_per_sequence: int, distortion: float = DEFAULT_DISTORTION
                ) -> tuple[IndexConfig, dict[str, dict[str, Any]]]:
    """``config`` with per-layer k_out, k_in from :func:`auto_dims`, and the report.

    ``config.dtype == "auto"`` picks the storage too: :func:`choose_storage` for EK-FAC
    eigen-coordinates, int4 for random sketches (measured best per byte there).
    """
    if config.dtype == "auto":
        dtype = (choose_storage(layers, curvature, bytes_per_sequence, distortion)[0]
                 if config.projection == "eigen" else "int4")
        config = replace(config, dtype=dtype)
    k_out, k_in, report = auto_dims(layers, curvature, bytes_per_sequence, config.dtype,
                                    distortion, config.projection)
    return replace(config, k_out=k_out, k_in=k_in), report
