"""A built projected-gradient index on disk: :class:`GradientIndex` (docs/method.md §7).

Directory layout (all writes atomic; ``manifest.json`` is rewritten after every shard):

* ``manifest.json`` -- format version, :class:`~.config.IndexConfig`, model fingerprint,
  layer names, gradient shapes and projected sizes, the build parts and the completed
  shards, rows.
* ``projections.safetensors`` -- ``{layer}/in`` (k_in, M+1) and ``{layer}/out`` (k_out, P),
  float64 (absent for the identity projection); with whitening the root is folded in
  (``"kron"``) or stored beside them as ``{layer}/q_in``, ``/q_out``, ``/scale``
  (``"ekfac"``, in the dtype gradients are computed in: float32 unless the model is
  float64; :mod:`.projection`).
* ``shard_00000.safetensors`` ... -- ``rows`` (n, D) in the storage dtype, or quantised
  ``codes`` and ``scales`` (:mod:`.codec`); the header holds the global row range
  ``[start, stop)`` it covers.
* ``curvature.safetensors`` -- the projected Gauss-Newton (:mod:`.curvature`).
* ``ann_ivf.faiss`` / ``ann_hnsw.faiss`` + ``.json`` -- approximate search (:mod:`.search`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from datasleuth.errors import DatasleuthError, listed
from datasleuth.layers import TrackedLayer, layers_by_name, resolve_layers
from datasleuth.scale.index.codec import decode, row_bytes, stored_shapes
from datasleuth.scale.index.config import (
    INDEX_FORMAT_VERSION,
    STORAGE_DTYPES,
    IndexConfig,
    config_differences,
    layer_difference,
)
from datasleuth.scale.index.curvature import CURVATURE_FILE, ProjectedCurvature, Whitened
from datasleuth.scale.index.projection import LayerProjection
from datasleuth.scale.index.search import approximate_search, exact_search
from datasleuth.scoring import Features
from datasleuth.storage import load_tensors, memmap_safetensors, model_fingerprint, read_json

__all__ = ["MANIFEST", "PROJECTIONS", "GradientIndex", "shard_name"]

MANIFEST = "manifest.json"
_BLOCK_BYTES = 256 << 20
PROJECTIONS = "projections.safetensors"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


class GradientIndex:
    """A built projected-gradient index on disk (see the module docstring).

    Open one with :meth:`open`; make one with :func:`~.build.build_index`.
    """

    def __init__(self, directory: Path, manifest: dict, projections: list[LayerProjection]):
        self.directory = directory
        self.manifest = manifest
        self.config = IndexConfig.from_dict(manifest["config"])
        self.projections = projections
        self._curvature: ProjectedCurvature | Whitened | None = None
        if self.config.whitened:
            self._curvature = Whitened(self.layer_names)
        elif (directory / CURVATURE_FILE).is_file():
            curvature = ProjectedCurvature.load(directory / CURVATURE_FILE)
            if curvature.metadata.get("fingerprint") == self.fingerprint:
                self._curvature = curvature

    @property
    def curvature(self) -> ProjectedCurvature | Whitened:
        """The preconditioner of this index's projected queries: the projected curvature,
        or for a whitened index the identity (its rows already carry the metric)."""
        if self._curvature is None:
            raise DatasleuthError(f"{self.directory} has no projected curvature; run "
                                  "fit_projected_curvature(model, task, loader, index) first")
        return self._curvature

    @curvature.setter
    def curvature(self, value: ProjectedCurvature | Whitened) -> None:
        self._curvature = value

    @property
    def has_curvature(self) -> bool:
        """Whether a projected curvature of this index's model was fitted."""
        return self._curvature is not None

    # -- description
    @property
    def layer_names(self) -> list[str]:
        return [p.name for p in self.projections]

    @property
    def features(self) -> dict[str, Features]:
        """Per-layer projection of captured (ā, Ds): the index's gradient features."""
        return {p.name: p.project for p in self.projections}

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
    def widths(self) -> list[int]:
        """Numbers of each layer in a row, in index order."""
        return [p.dim for p in self.projections]

    @property
    def bytes_per_row(self) -> int:
        """Disk per indexed sequence: D numbers in the storage dtype (with a scale per
        layer when quantised)."""
        return row_bytes(self.config.dtype, self.widths)

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
                    f"{directory} {layer_difference(index.layer_names, names)}; open it with "
                    "the layers it was built with, or build a new index for these"
                )
        if config is not None:
            index._check_projection(config)
        if model is not None:
            index.check_model(model)
        return index

    def _check_projection(self, config: IndexConfig) -> None:
        diff = config_differences(self.config, config, ("k_in", "k_out", "projection", "seed"))
        if diff:
            raise DatasleuthError(f"{self.directory} was built with another projection ({diff}); "
                                  "use the same projection settings or build a new index")

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
    def _mapped(self, shard: dict) -> dict[str, np.ndarray]:
        """The stored tensors of one shard, memory-mapped (:mod:`.codec`)."""
        mapped = memmap_safetensors(self.directory / shard["file"], "rebuild the index")
        want = stored_shapes(self.config.dtype, shard["stop"] - shard["start"], self.widths)
        for name, shape in want.items():
            if name not in mapped or tuple(mapped[name].shape) != shape:
                got = tuple(mapped[name].shape) if name in mapped else "nothing"
                raise DatasleuthError(f"{shard['file']} holds {name} of shape {got}, not "
                                      f"{shape} as the manifest says; rebuild the index")
        return mapped

    def _decode(self, mapped: dict[str, np.ndarray], pick: slice | np.ndarray,
                dtype: torch.dtype | None) -> Tensor:
        """Rows ``pick`` of a mapped shard as floats (n, D)."""
        return decode({k: np.array(v[pick]) for k, v in mapped.items()}, self.widths,
                      self.config.dtype, dtype)

    def iter_blocks(self, dtype: torch.dtype | None = None, block_rows: int | None = None,
                    shards: Sequence[dict] | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, rows (n ≤ block_rows, D))`` read from memory-mapped shards; by
        default blocks of about 256 MiB decoded (rows are wide when quantised: 16 KiB of
        one-bit codes decode to half a MiB of float32)."""
        block_rows = block_rows or self.block_rows(dtype)
        for shard in self.manifest["shards"] if shards is None else shards:
            mapped = self._mapped(shard)
            for lo in range(0, shard["stop"] - shard["start"], block_rows):
                yield shard["start"] + lo, self._decode(mapped, slice(lo, lo + block_rows), dtype)

    def iter_shards(self, dtype: torch.dtype | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, rows (n, D))`` shard by shard, cast to ``dtype`` if given."""
        for shard in self.manifest["shards"]:
            yield from self.iter_blocks(dtype, block_rows=max(1, shard["stop"] - shard["start"]),
                                        shards=[shard])

    def gather_rows(self, ids: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Rows ``ids`` (n,) read from the memory-mapped shards: (n, D)."""
        starts = np.array([s["start"] for s in self.manifest["shards"]])
        flat = ids.numpy()
        which = np.searchsorted(starts, flat, side="right") - 1
        out = torch.zeros(len(flat), self.dim, dtype=dtype or self.row_dtype)
        for j in np.unique(which):
            shard = self.manifest["shards"][j]
            pick = which == j
            got = self._decode(self._mapped(shard), flat[pick] - shard["start"], out.dtype)
            out[torch.from_numpy(pick)] = got
        return out

    def block_rows(self, dtype: torch.dtype | None = None) -> int:
        """Rows that decode to about 256 MiB in ``dtype`` (default :attr:`row_dtype`)."""
        return max(1, _BLOCK_BYTES // max(1, self.dim * (dtype or self.row_dtype).itemsize))

    @property
    def row_dtype(self) -> torch.dtype:
        """The dtype rows are read as by default: the float storage dtype, or float32."""
        return STORAGE_DTYPES.get(self.config.dtype, torch.float32)

    def sample_rows(self, n: int) -> Tensor:
        """``n`` rows spread evenly over the index, float32 (for training FAISS)."""
        ids = torch.linspace(0, self.rows - 1, max(1, min(n, self.rows))).round().long()
        return self.gather_rows(torch.unique(ids), torch.float32)

    def load_rows(self, dtype: torch.dtype | None = None) -> Tensor:
        """All rows in memory, (N, D). For small indices and tests."""
        parts = [rows for _, rows in self.iter_shards(dtype)]
        if not parts:
            return torch.zeros(0, self.dim, dtype=dtype or self.row_dtype)
        return torch.cat(parts)

    # -- queries
    def flatten(self, queries: Mapping[str, Tensor] | Tensor) -> Tensor:
        """(Q, D) query rows from {layer: (Q, D_ℓ)} (layers in index order), or as given."""
        if isinstance(queries, Mapping):
            missing = [n for n in self.layer_names if n not in queries]
            if missing:
                raise DatasleuthError(f"the queries lack layers {listed(missing)} of "
                                      f"{self.directory}; precondition them with "
                                      "features=index.features")
            queries = torch.cat([queries[n].reshape(queries[n].shape[0], -1)
                                 for n in self.layer_names], dim=1)
        q = queries[None] if queries.dim() == 1 else queries
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise DatasleuthError(f"queries must be (Q, {self.dim}) rows of this index, got "
                                  f"{tuple(q.shape)}; make them with precondition_queries("
                                  "..., features=index.features)")
        if self.rows == 0:
            raise DatasleuthError(f"{self.directory} has no rows yet; build the index first")
        return q.cpu() if q.is_floating_point() else q.cpu().float()

    def scores(self, queries: Mapping[str, Tensor] | Tensor) -> Tensor:
        """Influence of every indexed sequence on every query, (Q, N), in the queries' dtype."""
        q = self.flatten(queries)
        return torch.cat([q @ rows.t() for _, rows in self.iter_blocks(q.dtype)], dim=1)

    def search(
        self,
        queries: Mapping[str, Tensor] | Tensor,
        k: int = 100,
        exact: bool = True,
        *,
        method: str = "auto",
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Top-``k`` rows by score per query: (indices (Q, k) int64, scores (Q, k)).

        ``exact=True``: blocked products over memory-mapped shards, memory one block.
        ``exact=False``: FAISS (``method="auto"`` picks by size: ``"hnsw"``, a graph;
        ``"ivf"``, an inverted file; ``"ivfpq"``, one of quantised codes), built on first
        use shard by shard, saved in the index directory and extended as shards are
        appended; candidates re-scored exactly from the rows.
        """
        q = self.flatten(queries)
        if not (isinstance(k, int) and k >= 1):
            raise DatasleuthError(f"k must be a positive integer, got {k!r}")
        k = min(k, self.rows)
        if not exact:
            return approximate_search(self, q, k, method, nprobe=nprobe, ef_search=ef_search)
        return exact_search(self, q, k)


def _layer_names(model: nn.Module | None, layers: Sequence[str] | Sequence[TrackedLayer]) -> list:
    if model is not None:
        return [layer.name for layer in resolve_layers(model, layers)]
    return [x.name if isinstance(x, TrackedLayer) else str(x) for x in layers]


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise DatasleuthError(f"{directory} holds no gradient index ({MANIFEST} is missing); "
                              "build one with build_index")
    manifest = read_json(path)
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise DatasleuthError(f"{directory} has index format {manifest.get('format_version')}, "
                              f"this datasleuth reads {INDEX_FORMAT_VERSION}; rebuild the index")
    return manifest


def _load_projections(directory: Path, manifest: dict) -> list[LayerProjection]:
    tensors = load_tensors(directory / PROJECTIONS)[0] if (directory / PROJECTIONS).is_file() \
        else {}
    out = []
    for layer in manifest["layers"]:
        name = layer["name"]
        t = {k: tensors.get(f"{name}/{k}")
             for k in ("out", "in", "q_out", "q_in", "scale", "select")}
        out.append(LayerProjection(name, layer["k_out"], layer["k_in"], t["out"], t["in"],
                                   t["q_out"], t["q_in"], t["scale"], t["select"]))
    return out
