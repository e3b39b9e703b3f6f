"""The preconditioner protocol and the one place damping is chosen (docs/method.md §3, §7).

Scoring needs one thing from a curvature estimate: (G + λI)⁻¹ applied to per-example
layer gradients. Everything that can do that is a :class:`Preconditioner` — the
Kronecker-factored curvatures of :mod:`datasleuth.curvature` (identity, diagonal,
K-FAC, EK-FAC), the dense and iterative references of :mod:`datasleuth.estimators`,
and the projected curvature of an index, whose "layer gradients" are projected rows.

Damping λ_ℓ of a layer is chosen by :func:`resolve_damping` wherever curvature is
fitted: a number for every layer, one number per layer, or, by default,
``scale`` × the mean eigenvalue of that layer's curvature (Grosse et al. 2023 use 0.1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

from datasleuth.errors import DatasleuthError

__all__ = ["DEFAULT_DAMPING_SCALE", "Damping", "Preconditioner", "resolve_damping"]

DEFAULT_DAMPING_SCALE = 0.1
Damping = float | Mapping[str, float] | None


class Preconditioner(Protocol):
    """Any object with these members can precondition query gradients for scoring."""

    kind: str

    @property
    def layer_names(self) -> list[str]: ...

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """(G + λI)⁻¹ applied to per-example layer gradients {name: (B, ...)}."""
        ...

    def to(self, device: torch.device | str) -> Preconditioner: ...


def resolve_damping(
    damping: Damping,
    name: str,
    mean_eigenvalue: float | None = None,
    scale: float = DEFAULT_DAMPING_SCALE,
    allow_zero: bool = False,
) -> float:
    """λ_ℓ of layer ``name`` (docs/method.md §3).

    ``damping``: a number (every layer), a mapping {layer: number}, or ``None`` for
    ``scale`` × ``mean_eigenvalue`` (``scale`` itself when the layer's curvature is
    zero). The result must be finite and positive (``allow_zero``: non-negative, for
    exact references of a positive-definite matrix).
    """
    if damping is None:
        if mean_eigenvalue is None:
            raise DatasleuthError(f"layer {name!r} has no fitted curvature to take a relative "
                                  "damping from; give the damping as a number")
        if not (math.isfinite(scale) and scale > 0):
            raise DatasleuthError(f"the damping scale must be finite and > 0, got {scale}; "
                                  "use e.g. 0.1")
        value = scale * mean_eigenvalue if mean_eigenvalue > 0 else scale
    elif isinstance(damping, Mapping):
        if name not in damping:
            raise DatasleuthError(f"damping has no value for layer {name!r}; give one per "
                                  "tracked layer or a single number")
        value = _number(damping[name], name)
    else:
        value = _number(damping, name)
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise DatasleuthError(f"damping must be finite and {bound}, got {value} for layer "
                              f"{name!r}; use e.g. 1e-3")
    return value


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatasleuthError(f"damping for layer {name!r} must be a number, got {value!r}")
    return float(value)
