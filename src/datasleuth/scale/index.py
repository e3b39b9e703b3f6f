"""A projected-gradient index of a training corpus (METHOD.md §7 "Projected gradients";
Choe et al. 2024, LoGra).

Per tracked layer ℓ with homogeneous input ā ∈ R^(M+1) and output pre-activation
s ∈ R^P, two fixed random matrices P_in (k_in×(M+1)) and P_out (k_out×P) compress the
per-sequence layer gradient DW̄ = Σ_t Ds_t ā_tᵀ (P×(M+1)) to

    G̃ = P_out DW̄ P_inᵀ = Σ_t (P_out Ds_t)(P_in ā_t)ᵀ          (k_out×k_in)

computed right-hand side first: inputs and output gradients are projected per token and
only then summed as outer products, so DW̄ is never formed (Choe et al. 2024, Eq. 4-5).
The row of a sequence is the row-major flattening of every layer's G̃, layers in the
index's order: D = Σ_ℓ k_out,ℓ·k_in,ℓ numbers.

Sign and scale (docs/CONTRACT.md): the stored gradient is that of the log-likelihood
−L(z_m), so the influence on a query is directly

    score(q, m) = q̃ᵀ row_m,   q̃ = (G̃ + λI)⁻¹ P ∇θ f_q        (per layer, summed)

with G̃ = E_seq[g̃ g̃ᵀ] the Gauss-Newton matrix in the projected space (true Fisher with
sampled labels by default) and λ = 0.1 × its mean eigenvalue per layer. A positive score
means adding z_m raises f_q; scores are not divided by N. With ``projection="identity"``
and k equal to the layer sizes this is exactly the influence of METHOD.md §1 under a
dense per-layer curvature.

Projections are Gaussian with entries N(0, 1/k), drawn once from a generator seeded by
(``seed``, layer name, side) and stored in the index directory, so an index never depends
on the random-number generator of a later torch version.

Directory layout (all writes atomic; ``manifest.json`` is rewritten after every shard):

* ``manifest.json`` -- format version, :class:`IndexConfig`, model fingerprint, layer names,
  gradient shapes and projected sizes, the build parts and the completed shards, rows.
* ``projections.safetensors`` -- ``{layer}/in`` (k_in, M+1) and ``{layer}/out`` (k_out, P),
  float64 (absent for the identity projection).
* ``shard_00000.safetensors`` ... -- ``rows`` (n, D) in the storage dtype; the header holds
  the global row range ``[start, stop)`` it covers.
* ``curvature.safetensors`` -- per layer the projected Gauss-Newton ``{layer}/ggn``
  (D_ℓ×D_ℓ, float64), damping in the header (:func:`fit_projected_curvature`).
* ``ann_ivf.faiss`` / ``ann_hnsw.faiss`` + ``.json`` -- an approximate search index in
  FAISS's own binary format (:meth:`GradientIndex.search` with ``exact=False``).

Example::

    index = build_index(model, task, corpus.as_torch_dataset(), ["*.mlp.*"], "idx",
                        IndexConfig(k_in=16, k_out=16), batch_size=8,
                        collate_fn=corpus.collate)
    fit_projected_curvature(model, task, fit_loader, index)
    q = index.precondition_queries(model, task, query_batches)     # (Q, D)
    rows, scores = index.search(q, k=100)                          # (Q, 100) each
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, default_collate

from datasleuth.distributed import all_reduce_int, all_reduce_sum, rank_seed
from datasleuth.errors import DatasleuthError
from datasleuth.fitting import resolve_layers
from datasleuth.layers import TrackedLayer, backward_to_outputs, capture, layers_by_name
from datasleuth.progress import progress_bar
from datasleuth.storage import (
    atomic_path,
    load_tensors,
    model_fingerprint,
    read_json,
    save_tensors,
    write_json,
)
from datasleuth.task import Task
from datasleuth.utils import compute_dtype, to_device

__all__ = [
    "INDEX_FORMAT_VERSION",
    "IndexConfig",
    "ProjectedCurvature",
    "GradientIndex",
    "build_index",
    "fit_projected_curvature",
]

INDEX_FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
_PROJECTIONS = "projections.safetensors"
_CURVATURE = "curvature.safetensors"
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
_PROJECTIONS_KINDS = ("gaussian", "identity")
_ANN_METHODS = ("ivf", "hnsw")

KSpec = int | None | Mapping[str, int | None]


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


# --------------------------------------------------------------------------- configuration


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
            ``"identity"`` (no projection: requires full sizes; exact unprojected
            influence, for small models and tests).
        seed: seed of the Gaussian projections (combined with each layer's name).
        dtype: storage dtype of the rows, ``"float16"`` (default), ``"float32"`` or
            ``"float64"`` (tests, references). Gradients are always computed in float32
            (float64 for float64 models) and cast at the end.
        shard_size: sequences per shard file (the unit of resuming and of exact search).
    """

    k_in: KSpec = 16
    k_out: KSpec = 16
    projection: str = "gaussian"
    seed: int = 0
    dtype: str = "float16"
    shard_size: int = 4096

    def __post_init__(self) -> None:
        for what in ("k_in", "k_out"):
            value = getattr(self, what)
            if isinstance(value, Mapping):
                for name, k in value.items():
                    _check_k(k, f"{what}[{name!r}]")
                object.__setattr__(self, what, dict(sorted(value.items())))
            else:
                _check_k(value, what)
        if self.projection not in _PROJECTIONS_KINDS:
            raise DatasleuthError(f"projection must be one of {', '.join(_PROJECTIONS_KINDS)}, "
                                  f"not {self.projection!r}")
        sizes = [self.k_in, self.k_out]
        sizes += [x for v in sizes if isinstance(v, Mapping) for x in v.values()]
        if self.projection == "identity" and any(isinstance(v, int) for v in sizes):
            raise DatasleuthError("the identity projection keeps every dimension; set "
                                  "k_in=None and k_out=None with projection='identity'")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise DatasleuthError(f"seed must be an integer, got {self.seed!r}")
        if self.dtype not in _DTYPES:
            raise DatasleuthError(f"dtype must be one of {', '.join(_DTYPES)}, not {self.dtype!r}")
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


# ----------------------------------------------------------------------------- projection


def _layer_seed(seed: int, name: str, side: str) -> int:
    digest = hashlib.sha256(f"datasleuth-index:{seed}:{name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _gaussian(k: int, d: int, seed: int) -> Tensor:
    """(k, d) matrix with entries N(0, 1/k), so E[‖Px‖²] = ‖x‖² (Choe et al. 2024, §3)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(k)


@dataclass
class _Projection:
    """P_out (k_out×P) and P_in (k_in×(M+1)) of one layer; ``None`` = identity."""

    name: str
    k_out: int
    k_in: int
    p_out: Tensor | None
    p_in: Tensor | None

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    def project(self, a: Tensor, g: Tensor) -> Tensor:
        """Σ_t (P_out Ds_t)(P_in ā_t)ᵀ, flattened: (B,T,M+1), (B,T,P) -> (B, k_out·k_in)."""
        if self.p_in is not None:
            a = a @ self.p_in.to(a.device, a.dtype).t()  # (B, T, k_in)
        if self.p_out is not None:
            g = g @ self.p_out.to(g.device, g.dtype).t()  # (B, T, k_out)
        return torch.bmm(g.transpose(1, 2), a).reshape(a.shape[0], -1)  # (B, k_out·k_in)

    def project_dense(self, grad: Tensor) -> Tensor:
        """P_out V P_inᵀ for explicit layer gradients V (..., P, M+1), flattened; references."""
        if self.p_out is not None:
            grad = self.p_out.to(grad.dtype) @ grad
        if self.p_in is not None:
            grad = grad @ self.p_in.to(grad.dtype).t()
        return grad.reshape(*grad.shape[:-2], -1)


def _make_projections(layers: Sequence[TrackedLayer], config: IndexConfig) -> list[_Projection]:
    out = []
    for layer in layers:
        k_out, k_in = config.dims(layer)
        p, m = layer.grad_shape
        if config.projection == "identity":
            out.append(_Projection(layer.name, p, m, None, None))
        else:
            out.append(_Projection(
                layer.name, k_out, k_in,
                _gaussian(k_out, p, _layer_seed(config.seed, layer.name, "out")),
                _gaussian(k_in, m, _layer_seed(config.seed, layer.name, "in")),
            ))
    return out


# ------------------------------------------------------------------------------ streaming


def _stream_projected(
    model: nn.Module,
    task: Task,
    batches: Iterable[Any],
    layers: Sequence[TrackedLayer],
    projections: Sequence[_Projection],
    objective: str,
    on_rows: Callable[[Tensor], None],
    generator: torch.Generator | None = None,
    max_batches: int | None = None,
    desc: str = "",
    progress: bool = False,
) -> None:
    """Forward + output-gradient backward per batch; ``on_rows(rows (B, D))`` per batch.

    ``objective``: ``"loglik"`` (−L, the index rows), ``"measurement"`` (f, queries),
    ``"sampled"`` (log-likelihood of labels drawn from the model: true Fisher) or
    ``"empirical"`` (−L: empirical Fisher).
    """
    by_name = {p.name: p for p in projections}
    order = [p.name for p in projections]
    parts: dict[str, Tensor] = {}
    device = next(model.parameters()).device

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        parts[layer.name] = by_name[layer.name].project(a, g)

    was_training = model.training
    model.eval()
    try:
        with capture(model, layers, on_layer, dtype=compute_dtype(model)) as state:
            for i, batch in enumerate(progress_bar(batches, desc=desc, enabled=progress)):
                if max_batches is not None and i >= max_batches:
                    break
                batch = to_device(batch, device)
                state.set_batch(task.mask(batch))
                if objective == "measurement":
                    values = task.measurement(model, batch)
                elif objective == "sampled":
                    values = -task.sampled_loss(model, batch, generator)
                else:
                    values = -task.loss(model, batch)
                backward_to_outputs(values.sum(), state)
                on_rows(torch.cat([parts[name] for name in order], dim=1))  # (B, D)
                parts.clear()
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------ curvature


class ProjectedCurvature:
    """Damped Gauss-Newton per layer in the projected space, inverted exactly.

    G̃_ℓ = (1/N) Σ_n g̃_n g̃_nᵀ over per-sequence projected pseudo-gradients g̃ (D_ℓ), which
    is P G_ℓ Pᵀ for P = P_out ⊗ P_in; (G̃_ℓ + λ_ℓ I)⁻¹ is applied with a Cholesky solve in
    float64 (METHOD.md §7; Choe et al. 2024, §3.2).
    """

    def __init__(self, ggn: dict[str, Tensor], damping: dict[str, float], metadata: dict):
        self.ggn = ggn
        self.damping = damping
        self.metadata = metadata
        self._chol: dict[str, Tensor] = {}

    def _factor(self, name: str) -> Tensor:
        if name not in self._chol:
            g = self.ggn[name].double()
            eye = torch.eye(g.shape[0], dtype=torch.float64)
            self._chol[name] = torch.linalg.cholesky(0.5 * (g + g.t()) + self.damping[name] * eye)
        return self._chol[name]

    def precondition(self, name: str, v: Tensor) -> Tensor:
        """(G̃_ℓ + λ_ℓ I)⁻¹ v for rows v (Q, D_ℓ)."""
        x = torch.cholesky_solve(v.double().t().cpu(), self._factor(name)).t()
        return x.to(v.dtype).to(v.device)

    def dense(self, name: str) -> Tensor:
        """G̃_ℓ + λ_ℓ I, (D_ℓ, D_ℓ) float64; tests only."""
        g = self.ggn[name].double()
        return g + self.damping[name] * torch.eye(g.shape[0], dtype=torch.float64)

    def save(self, path: str | os.PathLike) -> None:
        meta = dict(self.metadata, damping=self.damping, format_version=INDEX_FORMAT_VERSION)
        save_tensors(path, {f"{n}/ggn": g for n, g in self.ggn.items()}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProjectedCurvature:
        tensors, meta = load_tensors(path)
        damping = {n: float(d) for n, d in meta.pop("damping").items()}
        return cls({n: tensors[f"{n}/ggn"] for n in damping}, damping, meta)


def fit_projected_curvature(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    index: GradientIndex,
    *,
    fisher: str = "sampled",
    damping: float | Mapping[str, float] | None = None,
    damping_scale: float = 0.1,
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = True,
) -> ProjectedCurvature:
    """Fit the projected Gauss-Newton of every layer of ``index`` and store it there.

    Streams ``loader`` once, accumulating (1/N) Σ g̃ g̃ᵀ per layer in float64 from the
    per-sequence projected pseudo-gradients, with labels sampled from the model
    (``fisher="sampled"``, the true Fisher = Gauss-Newton, METHOD.md §3) or the data's
    own labels (``"empirical"``). Damping λ_ℓ = ``damping_scale`` × mean eigenvalue of
    G̃_ℓ (= trace/D_ℓ) unless ``damping`` gives it (one number, or one per layer).
    Writes ``curvature.safetensors`` into the index directory and attaches the result
    to ``index`` (METHOD.md §7; Choe et al. 2024).
    """
    if fisher not in ("sampled", "empirical"):
        raise DatasleuthError(f"fisher must be 'sampled' or 'empirical', not {fisher!r}")
    if not damping_scale > 0:
        raise DatasleuthError(f"damping_scale must be > 0, got {damping_scale}")
    index.check_model(model)
    layers = layers_by_name(model, index.layer_names)
    sums = {p.name: torch.zeros(p.dim, p.dim, dtype=torch.float64) for p in index.projections}
    count = [0]
    slices = index.layer_slices

    def on_rows(rows: Tensor) -> None:
        for name, sl in slices.items():
            g = rows[:, sl].double().cpu()  # (B, D_ℓ)
            sums[name] += g.t() @ g
        count[0] += rows.shape[0]

    generator = torch.Generator().manual_seed(rank_seed(seed))
    _stream_projected(model, task, loader, layers, index.projections, fisher, on_rows,
                      generator, max_batches, "fit projected curvature", progress)
    all_reduce_sum(list(sums.values()))  # one loader shard per process (datasleuth.distributed)
    count[0] = all_reduce_int(count[0])
    if count[0] == 0:
        raise DatasleuthError("the curvature loader yielded no batches; pass a non-empty loader")
    ggn, damp = {}, {}
    for name, s in sums.items():
        ggn[name] = s / count[0]
        if isinstance(damping, Mapping):
            if name not in damping:
                raise DatasleuthError(f"damping has no value for layer {name!r}; give one per "
                                      "layer or a single number")
            damp[name] = float(damping[name])
        elif damping is not None:
            damp[name] = float(damping)
        else:
            mean = float(torch.diagonal(ggn[name]).mean())
            damp[name] = damping_scale * mean if mean > 0 else damping_scale
        if not damp[name] > 0:
            raise DatasleuthError(f"damping must be > 0, got {damp[name]} for layer {name!r}")
    meta = {"fisher": fisher, "seed": seed, "damping_scale": damping_scale,
            "sequences": count[0], "fingerprint": index.fingerprint,
            "config": index.config.to_dict()}
    curvature = ProjectedCurvature(ggn, damp, meta)
    curvature.save(index.directory / _CURVATURE)
    index.curvature = curvature
    return curvature


# ---------------------------------------------------------------------------------- index


class GradientIndex:
    """A built projected-gradient index on disk (see the module docstring).

    Open one with :meth:`open`; make one with :func:`build_index`.
    """

    def __init__(self, directory: Path, manifest: dict, projections: list[_Projection]):
        self.directory = directory
        self.manifest = manifest
        self.config = IndexConfig.from_dict(manifest["config"])
        self.projections = projections
        self.curvature: ProjectedCurvature | None = None
        if (directory / _CURVATURE).is_file():
            curvature = ProjectedCurvature.load(directory / _CURVATURE)
            if curvature.metadata.get("fingerprint") == self.fingerprint:
                self.curvature = curvature

    # -- description
    @property
    def layer_names(self) -> list[str]:
        return [p.name for p in self.projections]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def rows(self) -> int:
        """Number of indexed sequences N."""
        return int(self.manifest["rows"])

    @property
    def dim(self) -> int:
        """Row length D = Σ_ℓ k_out,ℓ·k_in,ℓ."""
        return sum(p.dim for p in self.projections)

    @property
    def bytes_per_row(self) -> int:
        """Disk per indexed sequence: D numbers in the storage dtype."""
        return self.dim * _DTYPES[self.config.dtype].itemsize

    @property
    def layer_slices(self) -> dict[str, slice]:
        """Where each layer's flattened (k_out, k_in) block sits in a row."""
        out, start = {}, 0
        for p in self.projections:
            out[p.name] = slice(start, start + p.dim)
            start += p.dim
        return out

    @property
    def shards(self) -> list[dict]:
        """Completed shards: ``{"file", "start", "stop"}`` in row order."""
        return list(self.manifest["shards"])

    @property
    def complete(self) -> bool:
        """Whether the last build or append ran to the end of its data."""
        return all(part["done"] == part["source_rows"] for part in self.manifest["parts"])

    def __repr__(self) -> str:
        return (f"GradientIndex({str(self.directory)!r}, rows={self.rows}, dim={self.dim}, "
                f"layers={len(self.projections)}, dtype={self.config.dtype})")

    # -- opening and checking
    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        model: nn.Module | None = None,
        layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
        config: IndexConfig | None = None,
    ) -> GradientIndex:
        """Open an index; refuse it if ``model``, ``layers`` or the projection differ.

        ``layers`` are names or glob patterns (resolved on ``model`` when given);
        ``config`` is compared on its projection fields (k_in, k_out, projection, seed).
        """
        directory = Path(directory)
        manifest = _read_manifest(directory)
        index = cls(directory, manifest, _load_projections(directory, manifest))
        if layers is not None:
            names = _layer_names(model, layers)
            if names != index.layer_names:
                raise DatasleuthError(
                    f"{directory} indexes layers {index.layer_names}, not {names}; open it with "
                    "the layers it was built with, or build a new index for these"
                )
        if config is not None:
            index._check_projection(config)
        if model is not None:
            index.check_model(model)
        return index

    def _check_projection(self, config: IndexConfig) -> None:
        keys = ("k_in", "k_out", "projection", "seed")
        have, want = self.config.to_dict(), config.to_dict()
        diff = [k for k in keys if have[k] != want[k]]
        if diff:
            shown = ", ".join(f"{k}={have[k]!r} (not {want[k]!r})" for k in diff)
            raise DatasleuthError(f"{self.directory} was built with projection {shown}; use the "
                                  "same projection settings or build a new index")

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose tracked layers or weights differ from the indexed one."""
        layers = layers_by_name(model, self.layer_names)
        fp = model_fingerprint(model, layers)
        if fp != self.fingerprint:
            raise DatasleuthError(
                f"{self.directory} was built from a different model or set of tracked layers "
                f"(fingerprint {self.fingerprint} != {fp}); use that model or rebuild the index"
            )

    # -- rows
    def iter_shards(self, dtype: torch.dtype | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, rows (n, D))`` shard by shard, cast to ``dtype`` if given."""
        for shard in self.manifest["shards"]:
            with safe_open(str(self.directory / shard["file"]), framework="pt") as f:
                rows = f.get_tensor("rows")
            if rows.shape != (shard["stop"] - shard["start"], self.dim):
                raise DatasleuthError(f"{shard['file']} has shape {tuple(rows.shape)}, not the "
                                      "one in the manifest; rebuild the index")
            yield shard["start"], rows if dtype is None else rows.to(dtype)

    def load_rows(self, dtype: torch.dtype | None = None) -> Tensor:
        """All rows in memory, (N, D). For small indices and tests."""
        parts = [rows for _, rows in self.iter_shards(dtype)]
        if not parts:
            return torch.zeros(0, self.dim, dtype=dtype or _DTYPES[self.config.dtype])
        return torch.cat(parts)

    # -- queries
    def query_gradients(
        self, model: nn.Module, task: Task, query_loader: Iterable[Any], progress: bool = False
    ) -> Tensor:
        """Projected gradients P ∇f of the queries' measurement, (Q, D), not preconditioned."""
        self.check_model(model)
        layers = layers_by_name(model, self.layer_names)
        chunks: list[Tensor] = []
        _stream_projected(model, task, query_loader, layers, self.projections, "measurement",
                          lambda rows: chunks.append(rows), desc="query gradients",
                          progress=progress)
        if not chunks:
            raise DatasleuthError("the query loader yielded no batches; give at least one query")
        return torch.cat(chunks)

    def precondition(self, grads: Tensor) -> Tensor:
        """Apply (G̃_ℓ + λ_ℓ I)⁻¹ to each layer block of projected gradients (Q, D)."""
        if self.curvature is None:
            raise DatasleuthError(f"{self.directory} has no projected curvature; run "
                                  "fit_projected_curvature(model, task, loader, index) first")
        out = torch.empty_like(grads)
        for name, sl in self.layer_slices.items():
            out[:, sl] = self.curvature.precondition(name, grads[:, sl])
        return out

    def precondition_queries(
        self, model: nn.Module, task: Task, query_loader: Iterable[Any], progress: bool = False
    ) -> Tensor:
        """q̃ = (G̃ + λI)⁻¹ P ∇f per layer for every query: (Q, D), ready for :meth:`search`."""
        return self.precondition(self.query_gradients(model, task, query_loader, progress))

    def _queries(self, q_pre: Tensor) -> Tensor:
        if q_pre.dim() == 1:
            q_pre = q_pre[None]
        if q_pre.dim() != 2 or q_pre.shape[1] != self.dim:
            raise DatasleuthError(f"queries must be (Q, {self.dim}) rows of this index, got "
                                  f"{tuple(q_pre.shape)}; make them with precondition_queries")
        if self.rows == 0:
            raise DatasleuthError(f"{self.directory} has no rows yet; build the index first")
        return q_pre.cpu() if q_pre.is_floating_point() else q_pre.cpu().float()

    def scores(self, q_pre: Tensor) -> Tensor:
        """Influence of every indexed sequence on every query, (Q, N), in q_pre's dtype."""
        q = self._queries(q_pre)
        return torch.cat([q @ rows.t() for _, rows in self.iter_shards(q.dtype)], dim=1)

    def search(
        self,
        q_pre: Tensor,
        k: int = 100,
        exact: bool = True,
        *,
        method: str = "hnsw",
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Top-``k`` rows by score per query: (indices (Q, k) int64, scores (Q, k)).

        ``exact=True``: blocked products shard by shard with a running ``torch.topk``
        merge, memory one shard. ``exact=False``: a FAISS inner-product index
        (``method="hnsw"``, a graph, or ``"ivf"``, an inverted file with nlist chosen
        from N; see :class:`_AnnIndex`), built on first use and saved in the index
        directory (FAISS's binary format, rebuilt after an append); candidates are
        re-scored from the vectors FAISS holds (float32), so returned scores are the
        true scores of the returned rows.
        """
        q = self._queries(q_pre)
        if not (isinstance(k, int) and k >= 1):
            raise DatasleuthError(f"k must be a positive integer, got {k!r}")
        k = min(k, self.rows)
        if not exact:
            return self._ann(method).search(q, k, nprobe=nprobe, ef_search=ef_search)
        best_s = q.new_empty(q.shape[0], 0)
        best_i = torch.empty(q.shape[0], 0, dtype=torch.long)
        for start, rows in self.iter_shards(q.dtype):
            s = q @ rows.t()  # (Q, n)
            ids = torch.arange(start, start + rows.shape[0]).expand(q.shape[0], -1)  # (Q, n)
            cand_s, cand_i = torch.cat([best_s, s], 1), torch.cat([best_i, ids], 1)
            top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
            best_s, best_i = top.values, cand_i.gather(1, top.indices)
        return best_i, best_s

    def _ann(self, method: str) -> _AnnIndex:
        if method not in _ANN_METHODS:
            raise DatasleuthError(f"method must be one of {', '.join(_ANN_METHODS)}, "
                                  f"not {method!r}")
        return _AnnIndex.load_or_build(self, method)


# ---------------------------------------------------------------------- approximate search


def _default_nlist(n: int) -> int:
    """4·√N inverted lists, but at least 39 training points per list (FAISS's advice)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


class _AnnIndex:
    """Approximate maximum-inner-product search with FAISS (``METRIC_INNER_PRODUCT``).

    ``"hnsw"``: a navigable small-world graph over the rows (M = 32 links, efConstruction
    80, efSearch max(128, 2k)); needs no training and keeps high recall on unstructured
    data. ``"ivf"``: an inverted file whose nlist is chosen from N
    (:func:`_default_nlist`), trained on the rows with spherical (inner-product) k-means,
    searched in ``nprobe`` = nlist/4 lists by default: faster on large, clustered
    corpora, lower recall on unstructured ones (raise ``nprobe``).
    """

    def __init__(self, index: Any, method: str, meta: dict):
        self.index = index
        self.method = method
        self.meta = meta

    @staticmethod
    def _key(gi: GradientIndex) -> str:
        files = ",".join(f"{s['file']}:{s['start']}:{s['stop']}" for s in gi.shards)
        return hashlib.sha256(f"{gi.fingerprint}|{gi.rows}|{files}".encode()).hexdigest()[:32]

    @classmethod
    def load_or_build(cls, gi: GradientIndex, method: str) -> _AnnIndex:
        import faiss

        path = gi.directory / f"ann_{method}.faiss"
        meta_path = gi.directory / f"ann_{method}.json"
        key = cls._key(gi)
        if path.is_file() and meta_path.is_file():
            meta = read_json(meta_path)
            if meta.get("key") == key:
                return cls(faiss.read_index(str(path)), method, meta)
        x = np.ascontiguousarray(gi.load_rows(torch.float32).numpy())  # (N, D)
        d = x.shape[1]
        meta: dict[str, Any] = {"key": key, "method": method, "rows": gi.rows}
        if method == "ivf":
            nlist = _default_nlist(len(x))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.add(x)
            index.make_direct_map()  # for re-scoring by reconstruct_batch
            meta.update(nlist=nlist, nprobe=max(1, int(math.ceil(nlist / 4))))
        else:
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.add(x)
            meta.update(M=32, ef_construction=80, ef_search=128)
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
        write_json(meta_path, meta)
        return cls(index, method, meta)

    def search(
        self, q: Tensor, k: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[Tensor, Tensor]:
        qf = np.ascontiguousarray(q.to(torch.float32).numpy())  # (Q, D)
        if self.method == "ivf":
            self.index.nprobe = int(nprobe or self.meta["nprobe"])
        else:
            self.index.hnsw.efSearch = int(ef_search or max(self.meta["ef_search"], 2 * k))
        _, ids = self.index.search(qf, k)  # (Q, k), -1 where fewer than k were found
        ids_t = torch.from_numpy(ids.astype(np.int64))
        valid = ids_t >= 0
        vectors = self.index.reconstruct_batch(np.maximum(ids, 0).reshape(-1))  # (Q·k, D)
        vec = torch.from_numpy(vectors).reshape(len(qf), k, -1).to(q.dtype)
        scores = torch.einsum("qkd,qd->qk", vec, q)  # exact re-score of the candidates
        scores = torch.where(valid, scores, torch.full_like(scores, -math.inf))
        order = torch.argsort(scores, dim=1, descending=True)
        return ids_t.gather(1, order), scores.gather(1, order)


# ---------------------------------------------------------------------------------- build


def _layer_names(model: nn.Module | None, layers: Sequence[str] | Sequence[TrackedLayer]) -> list:
    if model is not None:
        return [layer.name for layer in resolve_layers(model, layers)]
    return [x.name if isinstance(x, TrackedLayer) else str(x) for x in layers]


def _read_manifest(directory: Path) -> dict:
    path = directory / _MANIFEST
    if not path.is_file():
        raise DatasleuthError(f"{directory} holds no gradient index ({_MANIFEST} is missing); "
                              "build one with build_index")
    manifest = read_json(path)
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise DatasleuthError(f"{directory} has index format {manifest.get('format_version')}, "
                              f"this datasleuth reads {INDEX_FORMAT_VERSION}; rebuild the index")
    return manifest


def _load_projections(directory: Path, manifest: dict) -> list[_Projection]:
    tensors = {} if manifest["config"]["projection"] == "identity" else \
        load_tensors(directory / _PROJECTIONS)[0]
    out = []
    for layer in manifest["layers"]:
        name = layer["name"]
        out.append(_Projection(name, layer["k_out"], layer["k_in"],
                               tensors.get(f"{name}/out"), tensors.get(f"{name}/in")))
    return out


def _new_manifest(
    model: nn.Module, layers: list[TrackedLayer], config: IndexConfig,
    projections: list[_Projection],
) -> dict:
    return {
        "format_version": INDEX_FORMAT_VERSION,
        "config": config.to_dict(),
        "fingerprint": model_fingerprint(model, layers),
        "layers": [
            {"name": layer.name, "kind": layer.kind, "grad_shape": list(layer.grad_shape),
             "k_out": p.k_out, "k_in": p.k_in}
            for layer, p in zip(layers, projections)
        ],
        "dim": sum(p.dim for p in projections),
        "projection_seed": config.seed,
        "parts": [],
        "shards": [],
        "rows": 0,
    }


def _open_for_build(
    directory: Path, model: nn.Module, layers: list[TrackedLayer], config: IndexConfig
) -> GradientIndex:
    """Open the index in ``directory`` for resuming/appending, or create an empty one."""
    if (directory / _MANIFEST).is_file():
        index = GradientIndex.open(directory)
        if index.config != config:
            raise DatasleuthError(
                f"{directory} holds an index built with {index.config}, not {config}; pass the "
                "same IndexConfig, or build into a new directory"
            )
        names = [layer.name for layer in layers]
        if names != index.layer_names:
            raise DatasleuthError(f"{directory} indexes layers {index.layer_names}, not {names}; "
                                  "pass the same layers, or build into a new directory")
        index.check_model(model)
        return index
    directory.mkdir(parents=True, exist_ok=True)
    projections = _make_projections(layers, config)
    if config.projection != "identity":
        tensors = {}
        for p in projections:
            tensors[f"{p.name}/out"], tensors[f"{p.name}/in"] = p.p_out, p.p_in
        save_tensors(directory / _PROJECTIONS, tensors,
                     {"format_version": INDEX_FORMAT_VERSION, "config": config.to_dict()})
    manifest = _new_manifest(model, layers, config, projections)
    write_json(directory / _MANIFEST, manifest)
    return GradientIndex(directory, manifest, projections)


def _start_part(index: GradientIndex, n: int, append: bool, resume: bool) -> dict | None:
    """The build part to (continue to) fill with ``n`` source rows, or None if done."""
    parts = index.manifest["parts"]
    last = parts[-1] if parts else None
    if last is not None and last["done"] < last["source_rows"]:  # an interrupted build
        if last["source_rows"] != n:
            raise DatasleuthError(
                f"the interrupted build in {index.directory} had {last['source_rows']} rows of "
                f"data, this dataset has {n}; pass the same dataset to finish it"
            )
        if not resume:  # drop what the interrupted part wrote, start it again
            kept = [s for s in index.manifest["shards"] if s["start"] < last["first_row"]]
            index.manifest["shards"] = kept
            index.manifest["rows"] = last["first_row"]
            last["done"] = 0
        return last
    if last is not None and not append:
        if resume and index.rows == n and len(parts) == 1:
            return None
        raise DatasleuthError(
            f"{index.directory} already holds a complete index of {index.rows} rows; pass "
            "append=True to add data, or delete the directory to rebuild it"
        )
    part = {"first_row": index.rows, "source_rows": n, "done": 0}
    parts.append(part)
    return part


def build_index(
    model: nn.Module,
    task: Task,
    dataset: Any,
    layers: Sequence[str] | Sequence[TrackedLayer] | None,
    out_dir: str | os.PathLike,
    config: IndexConfig | None = None,
    *,
    batch_size: int = 8,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    append: bool = False,
    resume: bool = True,
    progress: bool = True,
) -> GradientIndex:
    """Index the projected log-likelihood gradient of every sequence of ``dataset``.

    ``dataset`` is map-style (``len`` and ``dataset[i]``); batches are
    ``collate_fn([dataset[i] for i in range(lo, hi)])`` (default: torch's
    ``default_collate``), at most ``batch_size`` rows, never straddling a shard, so a row
    only ever depends on its shard's batches. Rows are written ``config.shard_size`` at a
    time; the manifest is rewritten after each shard, so a killed build resumes with
    ``resume=True`` (the default) at its first unfinished shard (``resume=False``
    rewrites the unfinished part from its start). ``append=True`` adds ``dataset`` after
    the existing rows. The objective is −L (the log-likelihood), so stored rows score
    queries directly (METHOD.md §7; Choe et al. 2024).
    """
    config = config or IndexConfig()
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DatasleuthError("dataset must be map-style (len() and dataset[i]); wrap an "
                              "iterable corpus in a list or a torch Dataset")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise DatasleuthError(f"batch_size must be a positive integer, got {batch_size!r}")
    tracked = resolve_layers(model, layers)
    directory = Path(out_dir)
    index = _open_for_build(directory, model, tracked, config)
    part = _start_part(index, len(dataset), append, resume)
    if part is None:
        return index
    collate = collate_fn or default_collate
    storage = _DTYPES[config.dtype]
    shard_id = len(index.manifest["shards"])
    bar = progress_bar(range(part["done"], part["source_rows"], config.shard_size),
                       desc="index shards", enabled=progress, unit="shard")
    for lo in bar:
        hi = min(lo + config.shard_size, part["source_rows"])
        loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size,
                            collate_fn=collate, shuffle=False)
        chunks: list[Tensor] = []
        _stream_projected(model, task, loader, tracked, index.projections, "loglik",
                          chunks.append)
        rows = torch.cat(chunks).cpu() if chunks else torch.zeros(0, index.dim)  # (n, D)
        if rows.shape[0] != hi - lo:
            raise DatasleuthError(f"rows {lo}..{hi} of the dataset gave {rows.shape[0]} "
                                  "sequences; collate_fn must keep one row per item")
        stored = rows.to(storage)
        if not bool(torch.isfinite(stored).all()):
            raise DatasleuthError(
                f"projected gradients of rows {lo}..{hi} are not finite in {config.dtype} "
                f"(max |x| = {float(rows.abs().max()):.3g}); use IndexConfig(dtype='float32')"
            )
        start = part["first_row"] + lo
        name = _shard_name(shard_id)
        save_tensors(directory / name, {"rows": stored},
                     {"format_version": INDEX_FORMAT_VERSION, "start": start,
                      "stop": start + len(stored), "fingerprint": index.fingerprint})
        index.manifest["shards"].append({"file": name, "start": start, "stop": start + len(stored)})
        index.manifest["rows"] = start + len(stored)
        part["done"] = hi
        write_json(directory / _MANIFEST, index.manifest)
        shard_id += 1
    write_json(directory / _MANIFEST, index.manifest)
    return index
