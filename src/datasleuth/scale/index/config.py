"""What an index stores and how it projects: :class:`IndexConfig` (docs/method.md §7)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from datasleuth.errors import DatasleuthError
from datasleuth.layers import TrackedLayer
from datasleuth.scale.index.codec import FLOAT_DTYPES, QUANTISED

__all__ = ["INDEX_FORMAT_VERSION", "IndexConfig", "KSpec", "STORAGE", "STORAGE_DTYPES",
           "config_differences", "layer_difference",
           "WHITENINGS"]

INDEX_FORMAT_VERSION = 1
STORAGE_DTYPES: dict[str, torch.dtype] = dict(FLOAT_DTYPES)
STORAGE = (*FLOAT_DTYPES, *QUANTISED)  # every storage of rows (:mod:`.codec`)
_PROJECTION_KINDS = ("gaussian", "identity", "eigen")
WHITENINGS = ("ekfac", "kron", "none")

KSpec = int | None | Mapping[str, int | None]


def _check_k(value: Any, what: str) -> None:
    ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
    if not ok:
        raise DatasleuthError(f"{what} must be a positive integer or None (full size), "
                              f"got {value!r}")


@dataclass(frozen=True)
class IndexConfig:
    """How an index projects and stores gradients; written into its manifest.

    Attributes:
        k_in: projected size of each layer's input side (``None`` = M+1, the full size),
            or a mapping from layer name to that size (layers not named get 16).
            Values above the layer's size are clamped to it.
        k_out: projected size of the output side (``None`` = P), same rules as ``k_in``.
        projection: ``"gaussian"`` (entries N(0, 1/k), Choe et al. 2024) or
            ``"eigen"`` (with ``whitening="ekfac"`` only: keep the k_out·k_in EK-FAC
            eigen-coordinates of largest Λ/(Λ + λ), the expected energy of each whitened
            coordinate; deterministic, biased, low variance), or
            ``"identity"`` (no projection: requires full sizes; exact unprojected
            influence, for small models and tests).
        seed: seed of the Gaussian projections (combined with each layer's name).
        dtype: storage of the rows, ``"float16"`` (default), ``"float32"`` or
            ``"float64"`` (tests, references), or quantised per row and layer to
            ``"int8"``, ``"int4"``, ``"int2"`` or ``"int1"`` (:mod:`.codec`: 2× to 16× the
            coordinates of float16 in the same bytes), or ``"auto"``: chosen by
            :func:`~.sizing.auto_config` within a byte budget (never stored). Gradients
            are always computed in float32 (float64 for float64 models) and stored at
            the end.
        shard_size: sequences per shard file (the unit of resuming and of exact search).
        whitening: ``"none"`` (LoGra: plain projections, queries preconditioned by a
            curvature refitted in the projected space), ``"kron"`` (Kronecker-factored
            square root of the fitted damped curvature, applied per token) or ``"ekfac"``
            (exact EK-FAC root (Λ + λ)^(−1/2) in the eigenbasis); whitened rows score
            each other directly (docs/method.md §11; :mod:`.projection`). Whitening needs the
            fitted curvature at build time.
    """

    k_in: KSpec = 16
    k_out: KSpec = 16
    projection: str = "gaussian"
    seed: int = 0
    dtype: str = "float16"
    shard_size: int = 4096
    whitening: str = "none"

    def __post_init__(self) -> None:
        for what in ("k_in", "k_out"):
            value = getattr(self, what)
            if isinstance(value, Mapping):
                for name, k in value.items():
                    _check_k(k, f"{what}[{name!r}]")
                object.__setattr__(self, what, dict(sorted(value.items())))
            else:
                _check_k(value, what)
        if self.projection not in _PROJECTION_KINDS:
            raise DatasleuthError(f"projection must be one of {', '.join(_PROJECTION_KINDS)}, "
                                  f"not {self.projection!r}")
        sizes = [self.k_in, self.k_out]
        sizes += [x for v in sizes if isinstance(v, Mapping) for x in v.values()]
        if self.projection == "identity" and any(isinstance(v, int) for v in sizes):
            raise DatasleuthError("the identity projection keeps every dimension; set "
                                  "k_in=None and k_out=None with projection='identity'")
        if self.whitening not in WHITENINGS:
            raise DatasleuthError(f"whitening must be one of {', '.join(WHITENINGS)}, "
                                  f"not {self.whitening!r}")
        if self.projection == "eigen" and self.whitening != "ekfac":
            raise DatasleuthError("projection='eigen' selects EK-FAC eigen-coordinates; use it "
                                  "with whitening='ekfac'")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise DatasleuthError(f"seed must be an integer, got {self.seed!r}")
        if self.dtype not in (*STORAGE, "auto"):
            raise DatasleuthError(f"dtype must be auto or one of {', '.join(STORAGE)}, "
                                  f"not {self.dtype!r}")
        if not (isinstance(self.shard_size, int) and self.shard_size >= 1):
            raise DatasleuthError(f"shard_size must be a positive integer, got {self.shard_size!r}")

    def dims(self, layer: TrackedLayer) -> tuple[int, int]:
        """(k_out, k_in) of ``layer``: the configured sizes, clamped to (P, M+1)."""
        p, m = layer.grad_shape

        def pick(spec: KSpec, full: int) -> int:
            k = spec.get(layer.name, 16) if isinstance(spec, Mapping) else spec
            return full if k is None else min(int(k), full)

        return pick(self.k_out, p), pick(self.k_in, m)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IndexConfig:
        return cls(**d)

    @property
    def whitened(self) -> bool:
        """Whether rows are whitened, i.e. score each other without a query curvature."""
        return self.whitening != "none"


def config_differences(stored: IndexConfig, given: IndexConfig,
                       names: tuple[str, ...] | None = None) -> str:
    """The fields ``names`` (default: all) that differ, as "field: A there vs B here", briefly:
    a per-layer mapping names its first differing layer and how many more differ."""
    parts = []
    for name in names or tuple(f.name for f in fields(IndexConfig)):
        a, b = getattr(stored, name), getattr(given, name)
        if a == b:
            continue
        if isinstance(a, dict) or isinstance(b, dict):
            keys = sorted(set(a if isinstance(a, dict) else ()) |
                          set(b if isinstance(b, dict) else ()))
            odd = [k for k in keys if _size(a, k) != _size(b, k)] or keys
            more = f" and {len(odd) - 1} more layers" if len(odd) > 1 else ""
            parts.append(f"{name}: {_size(a, odd[0])} there vs {_size(b, odd[0])} here "
                         f"for {odd[0]!r}{more}")
        else:
            parts.append(f"{name}: {a!r} there vs {b!r} here")
    return "; ".join(parts)


def _size(spec: object, layer: str) -> object:
    return spec.get(layer, "the default") if isinstance(spec, dict) else spec


def layer_difference(stored: list[str], given: list[str]) -> str:
    """"indexes N layers, not these M (layer i: A there, B here)"."""
    first = next((i for i, (a, b) in enumerate(zip(stored, given)) if a != b),
                 min(len(stored), len(given)))

    def at(names: list[str]) -> str:
        return repr(names[first]) if first < len(names) else "none"

    return (f"indexes {len(stored)} layers, not these {len(given)} (layer {first}: "
            f"{at(stored)} there, {at(given)} here)")
