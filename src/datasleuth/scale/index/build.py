"""Building an index: stream the corpus once, write projected rows shard by shard (§7).

A build is resumable: the manifest is rewritten after every shard, so a killed build
continues at its first unfinished shard; ``append`` adds data after the existing rows.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, default_collate

from datasleuth.curvature import Curvature
from datasleuth.distributed import active, barrier, rank_zero_first, world
from datasleuth.errors import DatasleuthError
from datasleuth.fsdp import is_sharded
from datasleuth.layers import TrackedLayer, resolve_layers
from datasleuth.progress import progress_counter
from datasleuth.scale.index.codec import encode
from datasleuth.scale.index.config import (
    INDEX_FORMAT_VERSION,
    IndexConfig,
    config_differences,
    layer_difference,
)
from datasleuth.scale.index.projection import LayerProjection, make_projections
from datasleuth.scale.index.sizing import size_report
from datasleuth.scale.index.store import MANIFEST, PROJECTIONS, GradientIndex, shard_name
from datasleuth.storage import model_fingerprint, read_json, save_tensors, write_json
from datasleuth.streaming import BatchEnd, stream
from datasleuth.task import Task
from datasleuth.utils import compute_dtype

__all__ = ["build_index", "projected_rows"]


def curvature_digest(curvature: Curvature, names: Sequence[str]) -> str:
    """Digest of the eigenvalues, bases and damping a whitened index was built with."""
    h = hashlib.sha256()
    for name in names:
        layer = curvature.layers[name]
        h.update(f"{name}:{layer.damping!r}".encode())
        bases = [b.dense() for b in (layer.q_out, layer.q_in) if b is not None]
        for t in (layer.eigenvalues, *bases):
            h.update(t.detach().double().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _new_manifest(
    model: nn.Module, layers: list[TrackedLayer], config: IndexConfig,
    projections: list[LayerProjection], curvature: Curvature | None,
) -> dict:
    whitening = sizes = None
    if curvature is not None:
        sizes = size_report(layers, curvature)
        for p in projections:
            sizes[p.name].update(k_out=p.k_out, k_in=p.k_in, dim=p.dim)
    if config.whitened and curvature is not None:
        whitening = {"kind": config.whitening, "curvature": curvature.kind,
                     "curvature_digest": curvature_digest(curvature, [ly.name for ly in layers])}
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
        "whitening": whitening,
        "sizes": sizes,  # per layer: effective dimension, theory's sketch size, chosen k
    }


def _open_for_build(
    directory: Path, model: nn.Module, layers: list[TrackedLayer], config: IndexConfig,
    curvature: Curvature | None, exists: bool,
) -> GradientIndex:
    """Open the index in ``directory`` for resuming/appending, or create an empty one
    (only rank 0 writes; under FSDP every process builds the manifest, a collective)."""
    if exists:
        index = GradientIndex.open(directory)
        if index.config != config:
            raise DatasleuthError(
                f"{directory} holds an index built with other settings "
                f"({config_differences(index.config, config)}); pass the same settings, or "
                "build into a new directory"
            )
        names = [layer.name for layer in layers]
        if names != index.layer_names:
            raise DatasleuthError(f"{directory} {layer_difference(index.layer_names, names)}; "
                                  "pass the same layers, or build into a new directory")
        index.check_model(model)
        _check_curvature(index, curvature)
        return index
    projections = make_projections(layers, config, curvature, compute_dtype(model))
    manifest = _new_manifest(model, layers, config, projections, curvature)
    if not _writes():
        return GradientIndex(directory, manifest, projections)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for p in projections for k, v in p.tensors().items()}
    if tensors:
        save_tensors(directory / PROJECTIONS, tensors,
                     {"format_version": INDEX_FORMAT_VERSION, "config": config.to_dict()})
    write_json(directory / MANIFEST, manifest)
    return GradientIndex(directory, manifest, projections)


def _check_curvature(index: GradientIndex, curvature: Curvature | None) -> None:
    """Refuse to add rows to a whitened index under another curvature than its own."""
    if not index.config.whitened:
        return
    if curvature is None:
        raise DatasleuthError(f"{index.directory} is whitened; pass the curvature it was built "
                              "with (curvature=...) to resume or append")
    if curvature_digest(curvature, index.layer_names) != \
            index.manifest["whitening"]["curvature_digest"]:
        raise DatasleuthError(f"{index.directory} was whitened with another fitted curvature; "
                              "pass that curvature, or build into a new directory")


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
    curvature: Curvature | None = None,
) -> GradientIndex:
    """Index the projected log-likelihood gradient of every sequence of ``dataset``.

    ``dataset`` is map-style (``len`` and ``dataset[i]``); batches are
    ``collate_fn([dataset[i] for i in range(lo, hi)])`` (default: torch's
    ``default_collate``), at most ``batch_size`` rows, never straddling a shard, so a row
    only ever depends on its shard's batches. Rows are written ``config.shard_size`` at a
    time; the manifest is rewritten after each shard, so a killed build resumes with
    ``resume=True`` (the default) at its first unfinished shard (``resume=False``
    rewrites the unfinished part from its start). Under ``torchrun`` each process writes
    every world-th shard and rank 0 merges the manifest (:func:`_build_sharded`); the
    directory equals a one-process build. ``append=True`` adds ``dataset`` after
    the existing rows. Rows are gradients of the log-likelihood −L, so they score
    queries directly (docs/method.md §7; Choe et al. 2024). A whitened
    ``config.whitening`` needs the fitted ``curvature`` (K-FAC or EK-FAC of the same
    layers); its rows then score each other as influence (docs/method.md §11). Given a
    ``curvature``, the manifest's ``sizes`` report each layer's effective dimension and
    the sketch size theory asks for (:mod:`.sizing`).
    """
    config = config or IndexConfig()
    _check_arguments(dataset, batch_size, config)
    tracked = resolve_layers(model, layers)
    directory = Path(out_dir)
    sharded = is_sharded(model)
    if sharded:  # model fingerprints are collectives: every process opens, rank 0 writes
        exists = (directory / MANIFEST).is_file()
        barrier()
        index = _open_for_build(directory, model, tracked, config, curvature, exists)
    else:
        with rank_zero_first():  # rank 0 creates the directory; the others open it
            index = _open_for_build(directory, model, tracked, config, curvature,
                                    (directory / MANIFEST).is_file())
    part = _start_part(index, len(dataset), append, resume)
    if part is None:
        return index
    collate = collate_fn or default_collate

    def shard_rows(lo: int, hi: int) -> dict[str, Tensor]:
        loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=batch_size,
                            collate_fn=collate, shuffle=False)
        try:  # stored batch by batch: a shard is never held as float rows
            rows = projected_rows(model, task, loader, tracked, index, store=True)
        except DatasleuthError as e:
            raise DatasleuthError(f"rows {lo}..{hi}: {e}") from None
        n = len(next(iter(rows.values())))
        if n != hi - lo:
            raise DatasleuthError(f"rows {lo}..{hi} of the dataset gave {n} sequences; "
                                  "collate_fn must keep one row per item")
        return rows

    with progress_counter("index", total=part["source_rows"], enabled=progress and not world()[0],
                          initial=part["done"]) as bar:  # in sequences, not shards
        if active() and not sharded:  # a sharded model computes every row on every rank
            return _build_sharded(index, part, shard_rows, bar.update)
        for lo in range(part["done"], part["source_rows"], config.shard_size):
            hi = min(lo + config.shard_size, part["source_rows"])
            rows = shard_rows(lo, hi)
            bar.update(hi - lo)
            _write_shard(index, part, lo, hi, rows)
    if _writes():
        write_json(directory / MANIFEST, index.manifest)
    return index


def _check_arguments(dataset: Any, batch_size: int, config: IndexConfig) -> None:
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DatasleuthError("dataset must be map-style (len() and dataset[i]); wrap an "
                              "iterable corpus in a list or a torch Dataset")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise DatasleuthError(f"batch_size must be a positive integer, got {batch_size!r}")
    if config.dtype == "auto":
        raise DatasleuthError("IndexConfig(dtype='auto') is resolved within a byte budget: "
                              "pass the config through auto_config(...) first, or name a "
                              "storage such as 'int4'")


def projected_rows(model: nn.Module, task: Task, loader: Any, layers: list[TrackedLayer],
                   index: GradientIndex, on_rows: Callable[[int], None] | None = None,
                   store: bool = False) -> Any:
    """Projected log-likelihood gradients of every sequence of ``loader``: (n, D) on the CPU,
    or with ``store`` the shard tensors of the index's storage (:func:`.codec.encode`),
    encoded batch by batch.

    ``on_rows(n)`` is told after every batch how many rows it gave (for progress).
    """
    features = index.features
    parts: dict[str, Tensor] = {}
    chunks: list[Any] = []

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        parts[layer.name] = features[layer.name](a, g)  # (B, D_ℓ)

    def on_batch(end: BatchEnd) -> None:
        rows = torch.cat([parts.pop(n) for n in index.layer_names], dim=1).cpu()
        chunks.append(encode(rows, index.widths, index.config.dtype) if store else rows)
        if on_rows is not None:
            on_rows(end.size)

    stream(model, task, loader, layers, on_layer, on_batch=on_batch)
    if not store:
        return torch.cat(chunks) if chunks else torch.zeros(0, index.dim)
    if not chunks:
        chunks = [encode(torch.zeros(0, index.dim), index.widths, index.config.dtype)]
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}


def _save_shard(index: GradientIndex, part: dict, lo: int, hi: int,
                tensors: dict[str, Tensor], name: str) -> dict:
    """Write rows lo..hi of the part (stored tensors, :mod:`.codec`) as shard file ``name``;
    its manifest entry."""
    start, n = part["first_row"] + lo, hi - lo
    save_tensors(index.directory / name, tensors,
                 {"format_version": INDEX_FORMAT_VERSION, "start": start,
                  "stop": start + n, "fingerprint": index.fingerprint})
    return {"file": name, "start": start, "stop": start + n}


def _write_shard(index: GradientIndex, part: dict, lo: int, hi: int,
                 rows: dict[str, Tensor]) -> None:
    """Store rows lo..hi of the part as the next shard and record it in the manifest
    (under FSDP every process keeps the manifest; rank 0 writes)."""
    name = shard_name(len(index.manifest["shards"]))
    start = part["first_row"] + lo
    entry = (_save_shard(index, part, lo, hi, rows, name) if _writes()
             else {"file": name, "start": start, "stop": start + hi - lo})
    index.manifest["shards"].append(entry)
    index.manifest["rows"] = entry["stop"]
    part["done"] = hi
    if _writes():
        write_json(index.directory / MANIFEST, index.manifest)


def _writes() -> bool:
    """Whether this process writes the index files: the only one, or rank 0."""
    return world()[0] == 0


def _rank_file(index: GradientIndex, rank: int) -> Path:
    return index.directory / f"manifest.rank{rank}.json"


def _build_sharded(index: GradientIndex, part: dict,
                   shard_rows: Callable[[int, int], dict[str, Tensor]],
                   on_rows: Callable[[int], None]) -> GradientIndex:
    """Many processes: shard j of the part goes to rank j mod world, named as one process
    would name it; each rank lists its shards in ``manifest.rank<r>.json`` (its resume
    point), and rank 0 merges them into one manifest. Equal to a one-process build."""
    rank, size = world()
    n, step = part["source_rows"], index.config.shard_size
    starts = list(range(part["done"], n, step))
    base = len(index.manifest["shards"])
    key = {"first_row": part["first_row"], "from": part["done"], "world": size,
           "fingerprint": index.fingerprint}
    path = _rank_file(index, rank)
    state = read_json(path) if path.is_file() else {}
    entries = state["shards"] if state.get("key") == key else []
    have = {e["file"] for e in entries}
    for j in range(rank, len(starts), size):
        lo, hi = starts[j], min(starts[j] + step, n)
        if shard_name(base + j) in have:
            continue
        rows = shard_rows(lo, hi)
        entries.append(_save_shard(index, part, lo, hi, rows, shard_name(base + j)))
        write_json(path, {"key": key, "shards": entries})
        on_rows(hi - lo)
    barrier()
    if rank == 0:
        merged = [e for r in range(size) for e in read_json(_rank_file(index, r))["shards"]]
        index.manifest["shards"].extend(sorted(merged, key=lambda e: e["start"]))
        index.manifest["rows"] = part["first_row"] + n
        part["done"] = n
        write_json(index.directory / MANIFEST, index.manifest)
        for r in range(size):
            _rank_file(index, r).unlink()
    barrier()
    return GradientIndex.open(index.directory)
