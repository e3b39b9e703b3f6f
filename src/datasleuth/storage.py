"""Artifacts on disk: one atomic writer, safetensors for tensors, JSON for metadata.

Nothing is ever pickled. Every file is written under a temporary name in its final
directory, flushed to disk (``fsync``), renamed into place (``os.replace``) and the
directory synced, so neither a killed run nor a power cut leaves a file that looks
complete but is not (:func:`atomic_path`, :func:`write_bytes`, :func:`write_text`).
Large tensors are written in pieces from disk (:func:`write_safetensors_stream`) and
read back memory-mapped (:func:`memmap_safetensors`). Metadata records a format
version, the configuration and a fingerprint of the model and its tracked layers;
loading against anything else is refused with a message that says what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from datasleuth.curvature import Basis, Curvature, LayerCurvature
from datasleuth.errors import DatasleuthError
from datasleuth.finite import check_finite
from datasleuth.layers import TrackedLayer

__all__ = [
    "FORMAT_VERSION",
    "atomic_path",
    "replace_durably",
    "check_writable",
    "write_bytes",
    "write_text",
    "write_json",
    "StreamedTensor",
    "write_safetensors_stream",
    "memmap_safetensors",
    "safetensors_header",
    "SAFETENSORS_DTYPES",
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
    """Yield a new temporary file next to ``path``; on success make it ``path``, durably.

    Write the temporary file any way you like (it exists, empty, with the mode a plain
    ``open`` would give: 0o666 minus the umask) and close it. When the block ends
    normally it is synced to disk and renamed onto ``path`` (:func:`replace_durably`);
    when it raises, it is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777  # 0o666 minus the umask
    try:
        yield tmp
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that made the file anew (0o600)
            os.chmod(tmp, mode)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: Free bytes an output folder must have before a run starts (results, reports, snapshots).
MIN_FREE_BYTES = 16 << 20


def check_writable(folder: str | os.PathLike, option: str = "--out") -> None:
    """Refuse, before any work, an output ``folder`` that cannot take files.

    The folder (or, when it does not exist yet, its nearest existing parent) must be a
    directory in which a file can be created, written and synced, on a file system with
    at least :data:`MIN_FREE_BYTES` free. Nothing is left behind.
    """
    folder = Path(folder)
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        what = "is a file" if probe_dir == folder else f"is under the file {probe_dir}"
        raise DatasleuthError(f"{option} {folder} {what}; give a folder")
    probe = probe_dir / f".datasleuth-write-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
        free = shutil.disk_usage(probe_dir).free
    except OSError as e:
        raise DatasleuthError(f"cannot write to {option} {folder} ({e.strerror or e}); choose "
                              "a writable folder with free space") from e
    if free < MIN_FREE_BYTES:
        raise DatasleuthError(f"{option} {folder} is on a full disk ({free} bytes free); free "
                              "some space or choose another folder")


def replace_durably(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename the finished file ``src`` onto ``dst`` (same file system) crash-safely.

    ``src`` is synced to disk first, then renamed with ``os.replace`` (atomic: readers
    see the old file or the new one, never a mix), then ``dst``'s directory is synced so
    the rename itself survives a power cut.
    """
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    _fsync_directory(Path(dst).parent)


def _fsync_directory(directory: Path) -> None:
    """Sync a directory entry table; a no-op where directories cannot be synced."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows, where a directory cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename is done
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` as UTF-8 (newlines kept as ``\\n``) atomically and durably."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON with sorted keys, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DatasleuthError(f"{path} does not exist; check the path or create it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasleuthError(f"{path} is not valid JSON ({e.msg}); delete it and re-run") from e


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """safetensors file with ``metadata`` stored as JSON in its header, written atomically.

    Tensors numpy can view are streamed from their own memory, one at a time
    (:func:`write_safetensors_stream`): safetensors' ``save_file`` first copies every
    tensor into bytes, doubling the memory of a multi-GiB factor file while it writes.
    """
    header = {"datasleuth": json.dumps(metadata, sort_keys=True)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if all(v.dtype in _STREAMED for v in tensors.values()):
        write_safetensors_stream(path, [(k, _STREAMED[v.dtype], tuple(v.shape), v.numpy())
                                        for k, v in sorted(tensors.items())], header)
        return
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
            # owned, allocator-aligned copies: safetensors 0.8 may hand back views of its
            # file map at any byte offset, and BLAS kernels round differently by alignment
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise DatasleuthError(f"{path} is not a readable safetensors file ({e}); delete it") from e
    if "datasleuth" not in header:
        raise DatasleuthError(f"{path} was not written by datasleuth; point to a datasleuth file")
    return tensors, json.loads(header["datasleuth"])


#: safetensors dtype names this module streams, and the numpy dtype each stores.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code) for name, code in (
        ("BOOL", "|b1"), ("U8", "|u1"), ("I8", "|i1"), ("U16", "<u2"), ("I16", "<i2"),
        ("F16", "<f2"), ("U32", "<u4"), ("I32", "<i4"), ("F32", "<f4"), ("U64", "<u8"),
        ("I64", "<i8"), ("F64", "<f8"),
    )
}
_COPY_CHUNK = 16 << 20
_STREAMED = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16",
             torch.float16: "F16", torch.int32: "I32", torch.float32: "F32",
             torch.int64: "I64", torch.float64: "F64"}  # torch dtypes numpy can view


class StreamedTensor(NamedTuple):
    """One tensor for :func:`write_safetensors_stream`.

    ``dtype`` is a safetensors dtype name (a key of :data:`SAFETENSORS_DTYPES`).
    ``data`` is an array (converted to ``dtype``) or the path of a file holding exactly
    the tensor's raw little-endian bytes in row-major order, copied in 16 MiB pieces.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | str | os.PathLike


def write_safetensors_stream(
    path: str | os.PathLike,
    tensors: Sequence[StreamedTensor | tuple[str, str, tuple[int, ...], Any]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file piece by piece, atomically, in bounded memory.

    Tensors are stored in the given order; raw-byte files are copied, never loaded
    whole, so tensors larger than RAM are fine. ``metadata`` (str to str) goes into the
    header's ``__metadata__``. Read the file with safetensors or :func:`memmap_safetensors`.
    """
    specs = [StreamedTensor(*t) for t in tensors]
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {spec.name!r} has dtype {spec.dtype!r}; use one of "
                             f"{', '.join(SAFETENSORS_DTYPES)}")
        if spec.name in header or spec.name == "__metadata__":
            raise ValueError(f"tensor name {spec.name!r} is reserved or given twice")
        nbytes = _count(spec.shape) * SAFETENSORS_DTYPES[spec.dtype].itemsize
        header[spec.name] = {"dtype": spec.dtype, "shape": list(spec.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for spec in specs:
            _write_tensor(out, spec, header[spec.name]["data_offsets"])


def _count(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _write_tensor(out: Any, spec: StreamedTensor, offsets: list[int]) -> None:
    nbytes = offsets[1] - offsets[0]
    if isinstance(spec.data, np.ndarray):
        if spec.data.size != _count(spec.shape):
            raise ValueError(f"tensor {spec.name!r} has {spec.data.size} values, shape "
                             f"{tuple(spec.shape)} needs {_count(spec.shape)}")
        array = np.ascontiguousarray(spec.data, dtype=SAFETENSORS_DTYPES[spec.dtype])
        out.write(array.reshape(-1).view(np.uint8))
        return
    size = os.path.getsize(spec.data)
    if size != nbytes:
        raise ValueError(f"tensor {spec.name!r}: {spec.data} holds {size} bytes, shape "
                         f"{tuple(spec.shape)} needs {nbytes}")
    with open(spec.data, "rb") as fh:
        shutil.copyfileobj(fh, out, _COPY_CHUNK)


def safetensors_header(path: str | os.PathLike) -> tuple[int, dict[str, Any], int]:
    """(header length, header, file size) of a safetensors file, reading only the header.

    Raises ``OSError``, ``ValueError`` or ``struct.error`` for a file that is not one
    (a header longer than the file is never read into memory).
    """
    size = os.stat(path).st_size
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise ValueError(f"its header claims {n} bytes of a {size}-byte file")
        return n, json.loads(fh.read(n)), size


def memmap_safetensors(
    path: str | os.PathLike, fix: str = "delete it and re-run the step that wrote it"
) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only memory-mapped numpy array.

    Nothing is read but the header, so files larger than RAM are fine. Dtypes are those
    of :data:`SAFETENSORS_DTYPES`. A truncated or malformed file raises
    :class:`DatasleuthError` naming ``fix`` as the remedy.
    """
    path = Path(path)
    try:
        n, header, size = safetensors_header(path)
        specs = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, spec in specs.items():
            begin, end = spec["data_offsets"]
            want = _count(spec["shape"]) * SAFETENSORS_DTYPES[spec["dtype"]].itemsize
            if begin < 0 or end - begin != want or 8 + n + end > size:
                raise ValueError(f"tensor {name!r} does not fit the file's {size} bytes")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        raise DatasleuthError(f"{path} is damaged ({e}); {fix}") from e
    out = {}
    for name, spec in specs.items():
        begin, end = spec["data_offsets"]
        dtype, shape = SAFETENSORS_DTYPES[spec["dtype"]], tuple(spec["shape"])
        if end == begin:  # np.memmap cannot map zero bytes
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + begin, shape=shape)
    return out


def model_fingerprint(model: nn.Module, layers: Sequence[TrackedLayer]) -> str:
    """Hash of the tracked layer names/shapes and a strided sample of every parameter.

    Sampling (at most 4096 values per tensor) keeps this fast for billion-parameter
    models while still telling two checkpoints of one architecture apart.
    """
    h = hashlib.sha256()
    for layer in layers:
        h.update(f"{layer.name}:{layer.kind}:{layer.grad_shape}|".encode())
    for name, p in model.named_parameters():
        full = getattr(p, "full_tensor", None)  # an FSDP shard: gather it (every process)
        flat = (full() if full is not None else p).detach().reshape(-1)
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
    meta.update(format_version=FORMAT_VERSION, kind=curvature.kind, layers=layers_meta,
                layer_order=list(curvature.layers))  # the JSON header sorts mapping keys
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
    order = meta.pop("layer_order", None) or list(meta["layers"])  # older files: sorted
    if sorted(order) != sorted(meta["layers"]):
        raise DatasleuthError(f"{path} lists other layers than it holds (damaged or edited); "
                              "re-run `datasleuth fit` to rebuild it")
    layers_out = {name: _stored_layer(tensors, name, meta["layers"][name], path)
                  for name in order}
    kind = meta.pop("kind")
    meta.pop("layers")
    return Curvature(kind, layers_out, meta)


def _stored_layer(tensors: dict[str, torch.Tensor], name: str, lm: dict,
                  path: str | os.PathLike) -> LayerCurvature:
    """One layer of a saved curvature; a missing tensor or a non-finite value is refused."""
    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise DatasleuthError(f"{path} is missing the tensor {key!r} (damaged or edited); "
                                  "delete it and re-run `datasleuth fit`")
        return tensors[key]

    q_out = [need(f"{name}/q_out/{i}") for i in range(lm["q_out_blocks"])]
    q_in = [need(f"{name}/q_in/{i}") for i in range(lm["q_in_blocks"])]
    damping = float(lm["damping"])
    eigenvalues = need(f"{name}/eigenvalues")
    for key, value in [("eigenvalues", eigenvalues), ("damping", torch.tensor(damping))] + [
            (f"eigenbasis {i}", q) for i, q in enumerate(q_out + q_in)]:
        check_finite(value, name, f"the stored {key}", f"in {path}",
                     "delete the file and re-run `datasleuth fit` (check the model's weights)")
    if damping <= 0:
        raise DatasleuthError(f"{path}: layer {name}: the stored damping {damping} is not "
                              "positive; delete the file and re-run `datasleuth fit`")
    return LayerCurvature(eigenvalues, damping, Basis(q_out) if q_out else None,
                          Basis(q_in) if q_in else None, tensors.get(f"{name}/s_eigenvalues"),
                          tensors.get(f"{name}/a_eigenvalues"))
