"""Artifacts on disk: safetensors for tensors, JSON for metadata, atomic writes.

Nothing is ever pickled. A file is written under a temporary name in its final
directory and renamed into place (``os.replace``), so a killed run never leaves a file
that looks complete. Metadata records a format version, the configuration and a
fingerprint of the model and its tracked layers; loading against anything else is
refused with a message that says what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from datasleuth.curvature import Basis, Curvature, LayerCurvature
from datasleuth.errors import DatasleuthError
from datasleuth.layers import TrackedLayer

__all__ = [
    "FORMAT_VERSION",
    "atomic_path",
    "write_json",
    "read_json",
    "save_tensors",
    "load_tensors",
    "model_fingerprint",
    "save_curvature",
    "load_curvature",
]

FORMAT_VERSION = 1
_SAMPLES_PER_TENSOR = 4096


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DatasleuthError(f"{path} does not exist; check the path or create it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasleuthError(f"{path} is not valid JSON ({e.msg}); delete it and re-run") from e


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """safetensors file with ``metadata`` stored as JSON in its header, written atomically."""
    header = {"datasleuth": json.dumps(metadata, sort_keys=True)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of :func:`save_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise DatasleuthError(f"{path} does not exist; run the step that writes it first")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DatasleuthError(f"{path} is not a readable safetensors file ({e}); delete it") from e
    if "datasleuth" not in header:
        raise DatasleuthError(f"{path} was not written by datasleuth; point to a datasleuth file")
    return tensors, json.loads(header["datasleuth"])


def model_fingerprint(model: nn.Module, layers: Sequence[TrackedLayer]) -> str:
    """Hash of the tracked layer names/shapes and a strided sample of every parameter.

    Sampling (at most 4096 values per tensor) keeps this fast for billion-parameter
    models while still telling two checkpoints of one architecture apart.
    """
    h = hashlib.sha256()
    for layer in layers:
        h.update(f"{layer.name}:{layer.kind}:{layer.grad_shape}|".encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float64).numpy()
        h.update(f"{name}:{tuple(p.shape)}|".encode())
        h.update(sample.round(6).tobytes())
    return h.hexdigest()[:32]


def save_curvature(curvature: Curvature, path: str | os.PathLike) -> None:
    """Save a :class:`Curvature` as one safetensors file with its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    layers_meta = {}
    for name, lc in curvature.layers.items():
        tensors[f"{name}/eigenvalues"] = lc.eigenvalues
        for key in ("s_eigenvalues", "a_eigenvalues"):
            if getattr(lc, key) is not None:
                tensors[f"{name}/{key}"] = getattr(lc, key)
        for side, basis in (("q_out", lc.q_out), ("q_in", lc.q_in)):
            for i, block in enumerate(basis.blocks if basis is not None else []):
                tensors[f"{name}/{side}/{i}"] = block
        layers_meta[name] = {
            "damping": lc.damping,
            "q_out_blocks": len(lc.q_out.blocks) if lc.q_out is not None else 0,
            "q_in_blocks": len(lc.q_in.blocks) if lc.q_in is not None else 0,
        }
    meta = dict(curvature.metadata)
    meta.update(format_version=FORMAT_VERSION, kind=curvature.kind, layers=layers_meta)
    save_tensors(path, tensors, meta)


def load_curvature(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    layers: Sequence[TrackedLayer] | None = None,
    expect: dict | None = None,
) -> Curvature:
    """Load a :class:`Curvature`; refuse it if the model, layers or config differ.

    ``expect`` maps metadata keys (e.g. ``{"config": {...}}``) to required values.
    """
    tensors, meta = load_tensors(path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasleuthError(
            f"{path} has format version {meta.get('format_version')}, this datasleuth reads "
            f"{FORMAT_VERSION}; re-run `datasleuth fit` to rebuild it"
        )
    if model is not None and layers is not None:
        fp = model_fingerprint(model, layers)
        if meta.get("fingerprint") != fp:
            raise DatasleuthError(
                f"{path} was fitted on a different model or set of tracked layers "
                f"(fingerprint {meta.get('fingerprint')} != {fp}); re-fit the curvature for "
                "this model"
            )
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise DatasleuthError(
                f"{path} was made with {key}={meta.get(key)!r}, not {value!r}; re-fit or "
                "change the configuration to match"
            )
    layers_out = {}
    for name, lm in meta["layers"].items():
        q_out = [tensors[f"{name}/q_out/{i}"] for i in range(lm["q_out_blocks"])]
        q_in = [tensors[f"{name}/q_in/{i}"] for i in range(lm["q_in_blocks"])]
        layers_out[name] = LayerCurvature(
            tensors[f"{name}/eigenvalues"],
            float(lm["damping"]),
            Basis(q_out) if q_out else None,
            Basis(q_in) if q_in else None,
            tensors.get(f"{name}/s_eigenvalues"),
            tensors.get(f"{name}/a_eigenvalues"),
        )
    kind = meta.pop("kind")
    meta.pop("layers")
    return Curvature(kind, layers_out, meta)
