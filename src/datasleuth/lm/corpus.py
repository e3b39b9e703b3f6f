"""Training corpus front end: read documents, pack them into fixed-length sequences.

Influence scores are computed per *training sequence* (METHOD.md §1: L(z, θ) is summed
over the tokens of one sequence z). Pretraining-style packing concatenates documents,
separated by an EOS token, and cuts the stream into sequences of exactly ``seq_len``
tokens. Every sequence keeps pointers back to the characters of the documents it came
from (:class:`Segment`), so any score can be shown as the original text, and token-wise
scores (METHOD.md §6) can be drawn on the original characters (:meth:`PackedCorpus.token_pieces`).

On-disk layout of a packed corpus directory (all files written atomically, the marker
``metadata.json`` last):

* ``tokens.safetensors`` -- ``input_ids`` int32 (N, seq_len), ``lengths`` int32 (N,)
* ``offsets.safetensors`` -- ``char_starts`` int32 (N, seq_len): character offset in its
  document where each token's text piece begins (-1 for EOS separators and padding)
* ``segments.parquet`` -- one row per (sequence, document) piece: ``sequence``,
  ``doc_index``, ``char_start``, ``char_end``, ``tok_start``, ``tok_end``
* ``documents.arrow`` -- Arrow IPC file with ``doc_index`` and ``text`` of every document
* ``metadata.json`` -- format version, seq_len, counts, tokenizer identity, sources, fingerprint

Token matrices are read back memory-mapped, so a packed corpus larger than RAM is fine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from datasleuth.errors import DatasleuthError
from datasleuth.progress import progress_bar
from datasleuth.storage import atomic_path

__all__ = [
    "CORPUS_FORMAT_VERSION",
    "EOS_MARKER",
    "Segment",
    "PackedCorpus",
    "load_documents",
    "pack_corpus",
    "corpus_fingerprint",
    "tokenizer_info",
]

CORPUS_FORMAT_VERSION = 1
#: Text piece shown for an EOS separator token in :meth:`PackedCorpus.token_pieces`.
EOS_MARKER = "⏎"

_KINDS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet",
          ".arrow": "arrow"}
_SOURCES_ATTR = "_datasleuth_sources"
_METADATA = "metadata.json"
_TOKENS = "tokens.safetensors"
_OFFSETS = "offsets.safetensors"
_SEGMENTS = "segments.parquet"
_DOCUMENTS = "documents.arrow"
_SEGMENT_COLUMNS = ("sequence", "doc_index", "char_start", "char_end", "tok_start", "tok_end")


class Segment(NamedTuple):
    """The part of one document that lies in one training sequence.

    ``tok_start:tok_end`` are token positions in the sequence (the document's own tokens;
    its EOS separator, when it falls in this sequence, sits at ``tok_end``).
    ``char_start:char_end`` are character offsets in the original document text. The
    segments of one document, in sequence order, tile its text exactly.
    """

    doc_index: int
    char_start: int
    char_end: int
    tok_start: int
    tok_end: int


# --------------------------------------------------------------------------- reading


def _expand(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[tuple[str, list[Path]]]:
    """Resolve user paths into consecutive groups of (kind, files) in the given order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise DatasleuthError("no corpus paths given; pass at least one file or directory")
    items: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DatasleuthError(f"corpus path {p} does not exist; check the path")
        if p.is_dir():
            if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
                items.append(("disk", p))
                continue
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in _KINDS
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise DatasleuthError(
                    f"directory {p} holds no .jsonl, .json, .txt, .parquet or .arrow files; "
                    "point to a directory of such files or a datasets save_to_disk folder"
                )
            items.extend((_KINDS[f.suffix.lower()], f) for f in found)
        else:
            kind = _KINDS.get(p.suffix.lower())
            if kind is None:
                raise DatasleuthError(
                    f"{p} has unknown extension {p.suffix!r}; use .jsonl, .json, .txt, .parquet "
                    "or .arrow (or a datasets save_to_disk folder)"
                )
            items.append((kind, p))
    groups: list[tuple[str, list[Path]]] = []
    for kind, p in items:
        if groups and groups[-1][0] == kind and kind != "disk":
            groups[-1][1].append(p)
        else:
            groups.append((kind, [p]))
    return groups


def _scan_json(files: Sequence[Path], text_field: str) -> None:
    """Find the first malformed record in JSON/JSONL files and raise a precise error."""
    for f in files:
        if f.suffix.lower() == ".json":
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DatasleuthError(
                    f"{f}:{e.lineno}: malformed JSON ({e.msg}); fix the file (or use JSON Lines, "
                    "one object per line)"
                ) from e
            continue
        with open(f, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasleuthError(
                        f"{f}:{lineno}: malformed JSON line ({e.msg}); fix or remove that line"
                    ) from e
                if not isinstance(obj, dict):
                    raise DatasleuthError(
                        f"{f}:{lineno}: expected a JSON object like {{\"{text_field}\": \"...\"}}, "
                        f"got {type(obj).__name__}; write one object per line"
                    )
                value = obj.get(text_field)
                if value is not None and not isinstance(value, str):
                    raise DatasleuthError(
                        f"{f}:{lineno}: field {text_field!r} is {type(value).__name__}, not a "
                        "string; store the document text as a string"
                    )


def _check_columns(columns: Sequence[str] | None, text_field: str, where: str) -> None:
    if columns is not None and text_field not in columns:
        raise DatasleuthError(
            f"{where} has no field {text_field!r} (fields: {', '.join(columns) or 'none'}); "
            "pass the right one with --text-field (text_field= in Python)"
        )


def _load_group(kind: str, files: list[Path], text_field: str, streaming: bool,
                cache_dir: str | None) -> Any:
    import datasets

    where = str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"
    if kind == "disk":
        try:
            ds = datasets.load_from_disk(str(files[0]))
        except Exception as e:
            raise DatasleuthError(
                f"could not read the saved dataset {files[0]} ({e}); re-save it with save_to_disk"
            ) from e
        if isinstance(ds, datasets.DatasetDict):
            if list(ds) == ["train"] or len(ds) == 1:
                ds = next(iter(ds.values()))
            else:
                raise DatasleuthError(
                    f"{files[0]} holds several splits ({', '.join(ds)}); point to one split's "
                    "folder instead"
                )
        _check_columns(ds.column_names, text_field, where)
        return ds.to_iterable_dataset() if streaming else ds
    kwargs: dict[str, Any] = {"data_files": [str(f) for f in files], "split": "train",
                              "streaming": streaming, "cache_dir": cache_dir}
    if kind == "text":
        kwargs["sample_by"] = "document"
        text_field = "text"
    if kind == "parquet":
        for f in files:
            try:
                rows = pq.ParquetFile(f).metadata.num_rows
            except Exception as e:
                raise DatasleuthError(f"{f} is not a readable Parquet file ({e}); check it") from e
            if rows == 0:
                raise DatasleuthError(
                    f"{f} holds no documents; add documents to it or leave it out"
                )
    if kind == "json":
        if any(f.stat().st_size == 0 for f in files):
            empty = next(f for f in files if f.stat().st_size == 0)
            raise DatasleuthError(f"{empty} is empty; add documents to it or leave it out")
        if not streaming:  # a malformed line otherwise surfaces without its line number
            try:
                ds = datasets.load_dataset(kind, **kwargs)
            except Exception as e:
                _scan_json(files, text_field)
                raise DatasleuthError(f"could not read {where} ({e}); check the file format") from e
            _check_columns(ds.column_names, text_field, where)
            return ds
    try:
        ds = datasets.load_dataset(kind, **kwargs)
    except DatasleuthError:
        raise
    except Exception as e:
        raise DatasleuthError(f"could not read {where} ({e}); check the file format") from e
    if streaming and kind == "json":
        ds = datasets.IterableDataset.from_generator(
            _guarded, gen_kwargs={"source": ds, "files": files, "text_field": text_field}
        )
    columns = ds.column_names
    if columns is None and streaming:
        first = next(iter(ds), None)
        columns = list(first) if first is not None else []
    _check_columns(columns, text_field, where)
    return ds


def _guarded(source: Iterable[dict], files: list[Path], text_field: str) -> Iterator[dict]:
    """Iterate a streaming JSON dataset, turning parse errors into file:line errors."""
    try:
        yield from source
    except Exception as e:
        _scan_json(files, text_field)
        raise DatasleuthError(f"could not read {files[0]} ({e}); check the file format") from e


def load_documents(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    text_field: str = "text",
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Any:
    """Read a text corpus with the ``datasets`` library.

    Accepts JSON Lines / JSON files (``text_field`` holds the text), ``.txt`` files (one
    file = one document; newlines are normalised to ``\\n``), Parquet, Arrow (``.arrow``
    files and ``save_to_disk`` folders) and directories of such files (sorted, recursive).
    Returns a memory-mapped ``datasets.Dataset`` (or an ``IterableDataset`` when
    ``streaming``) with two columns: ``text`` and ``doc_index``, the document's position
    in the corpus in reading order (paths in the given order, files within a directory
    sorted). That index is the one every result refers back to.
    """
    import datasets

    groups = _expand(paths)
    cache = str(cache_dir) if cache_dir is not None else None
    parts = []
    for kind, files in groups:
        ds = _load_group(kind, files, text_field, streaming, cache)
        field = "text" if kind == "text" else text_field
        ds = ds.select_columns([field])
        if field != "text":
            ds = ds.rename_column(field, "text")
        if not streaming:
            feature = ds.features["text"]
            if getattr(feature, "dtype", None) not in ("string", "large_string"):
                if kind == "json":
                    _scan_json(files, field)  # names the offending line
                raise DatasleuthError(
                    f"field {field!r} in {files[0]} holds {feature}, not text; pick the text "
                    "field with text_field"
                )
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    sources = [str(f.resolve()) for _, files in groups for f in files]
    if streaming:
        first = next(iter(ds), None)
        if first is None:
            raise DatasleuthError(f"the corpus {sources[0]} holds no documents; add documents")
        ds = ds.map(lambda ex, i: {"doc_index": i}, with_indices=True)
    else:
        if len(ds) == 0:
            raise DatasleuthError(f"the corpus {sources[0]} holds no documents; add documents")
        column = ds.data.column("text")
        if column.null_count:
            bad = pc.index(pc.is_null(column), True).as_py()
            raise DatasleuthError(
                f"document {bad} of the corpus has no {text_field!r} value (null); give every "
                "document a text or drop it"
            )
        ds = ds.add_column("doc_index", np.arange(len(ds), dtype=np.int64))
    setattr(ds, _SOURCES_ATTR, sources)  # read back by corpus_fingerprint / pack_corpus
    return ds


# --------------------------------------------------------------------------- identity


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Name, class, vocabulary size and a hash of the vocabulary and pipeline of a tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    vocab_hash = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    pipeline = ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # normalise the JSON so key order never changes the hash
        pipeline = json.dumps(json.loads(backend.to_str()), sort_keys=True)
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or ""),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": vocab_hash,
        "pipeline_sha256": hashlib.sha256(pipeline.encode()).hexdigest(),
    }


class _ContentHash:
    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, doc_index: int, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self._h.update(struct.pack("<qq", doc_index, len(data)))
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _is_paths(documents: Any) -> bool:
    if isinstance(documents, (str, os.PathLike)):
        return True
    return (isinstance(documents, (list, tuple)) and len(documents) > 0
            and all(isinstance(d, os.PathLike) for d in documents))


def _source_key(sources: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in sources:
        st = os.stat(s)
        h.update(f"{s}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return "files:" + h.hexdigest()


def _fingerprint(source_key: str, info: dict, seq_len: int, separator: int, text_field: str) -> str:
    payload = json.dumps(
        {"format": CORPUS_FORMAT_VERSION, "source": source_key, "seq_len": seq_len,
         "separator": separator, "text_field": text_field,
         "tokenizer": [info["vocab_sha256"], info["pipeline_sha256"], info["class"]]},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def corpus_fingerprint(
    documents: Any,
    tokenizer: Any,
    seq_len: int = 512,
    separator_token_id: int | None = None,
    text_field: str = "text",
) -> str:
    """Fingerprint of what :func:`pack_corpus` would produce from these inputs.

    For paths (or a dataset straight from :func:`load_documents`) it hashes file paths,
    sizes and modification times; for any other documents it hashes their text (one
    cheap pass, no tokenisation).
    """
    separator = _separator(tokenizer, separator_token_id)
    info = tokenizer_info(tokenizer)
    if _is_paths(documents):
        groups = _expand(documents)
        key = _source_key([str(f.resolve()) for _, fs in groups for f in fs])
    elif getattr(documents, _SOURCES_ATTR, None) is not None:
        key = _source_key(getattr(documents, _SOURCES_ATTR))
    else:
        h = _ContentHash()
        for batch in _iter_batches(documents, text_field, 1000):
            for idx, text in batch:
                h.update(idx, text)
        key = "content:" + h.hexdigest()
    return _fingerprint(key, info, seq_len, separator, text_field)


# --------------------------------------------------------------------------- packing


def _separator(tokenizer: Any, separator_token_id: int | None) -> int:
    if separator_token_id is not None:
        return int(separator_token_id)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DatasleuthError(
            "the tokenizer has no EOS token to put between documents; pass separator_token_id "
            "(or set tokenizer.eos_token)"
        )
    return int(eos)


def _iter_batches(
    documents: Any, text_field: str, batch_size: int
) -> Iterator[list[tuple[int, str]]]:
    """Yield lists of (doc_index, text) from a Dataset, IterableDataset or sequence."""
    import datasets

    if isinstance(documents, datasets.Dataset):
        has_index = "doc_index" in documents.column_names
        field = "text" if "text" in documents.column_names else text_field
        _check_columns(documents.column_names, field, "the documents")
        for start in range(0, len(documents), batch_size):
            rows = documents[start:start + batch_size]
            idx = rows["doc_index"] if has_index else range(start, start + len(rows[field]))
            yield _validated(list(zip(idx, rows[field], strict=True)))
        return
    batch: list[tuple[int, str]] = []
    for pos, item in enumerate(documents):
        if isinstance(item, str):
            batch.append((pos, item))
        elif isinstance(item, dict):
            field = "text" if "text" in item else text_field
            if field not in item:
                raise DatasleuthError(
                    f"document {pos} has no field {text_field!r} (fields: {', '.join(item)}); "
                    "pass the right one with --text-field (text_field= in Python)"
                )
            batch.append((int(item.get("doc_index", pos)), item[field]))
        else:
            raise DatasleuthError(
                f"document {pos} is a {type(item).__name__}; pass strings, dicts with a text "
                "field, a datasets Dataset or corpus paths"
            )
        if len(batch) >= batch_size:
            yield _validated(batch)
            batch = []
    if batch:
        yield _validated(batch)


def _validated(batch: list[tuple[int, Any]]) -> list[tuple[int, str]]:
    for idx, text in batch:
        if not isinstance(text, str):
            raise DatasleuthError(
                f"document {idx} has no text ({type(text).__name__}); give every document a "
                "string text or drop it"
            )
    return [(int(i), t) for i, t in batch]


def _tokenize(tokenizer: Any, texts: list[str], sep: int) -> tuple[np.ndarray, ...]:
    """Tokenise a batch; returns flat arrays (ids, char starts, char ends, ordinal, is_eos)."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False)
    ids_l, starts_l, ends_l, ord_l = [], [], [], []
    for k, (text, ids, offsets) in enumerate(
        zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True)
    ):
        n = len(ids)
        tlen = len(text)
        if n:
            starts = np.asarray(offsets, dtype=np.int64).reshape(n, 2)[:, 0]
            starts = np.clip(np.maximum.accumulate(starts), 0, tlen)
            starts[0] = 0  # leading whitespace belongs to the first token's piece
            ends = np.append(starts[1:], tlen)
            eos_start = tlen
        else:  # a document with no tokens: its EOS carries the (whitespace) text
            starts = ends = np.zeros(0, dtype=np.int64)
            eos_start = 0
        ids_l.append(np.append(np.asarray(ids, dtype=np.int64), sep))
        starts_l.append(np.append(starts, eos_start))
        ends_l.append(np.append(ends, tlen))
        ord_l.append(np.full(n + 1, k, dtype=np.int64))
    ids = np.concatenate(ids_l)
    is_eos = np.zeros(len(ids), dtype=bool)
    is_eos[np.cumsum([len(a) for a in ids_l]) - 1] = True
    return ids, np.concatenate(starts_l), np.concatenate(ends_l), np.concatenate(ord_l), is_eos


def _write_safetensors(
    path: Path,
    tensors: list[tuple[str, str, tuple[int, ...], Path | np.ndarray]],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file, streaming raw tensor bytes from disk (bounded memory)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    sizes = {"I32": 4, "I64": 8}
    for name, dtype, shape, _ in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for _, _, _, src in tensors:
            if isinstance(src, np.ndarray):
                out.write(np.ascontiguousarray(src).astype("<i4", copy=False).tobytes())
            else:
                with open(src, "rb") as fh:
                    shutil.copyfileobj(fh, out, 16 << 20)


def _memmap_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file as a read-only numpy array."""
    dtypes = {"I32": np.dtype("<i4"), "I64": np.dtype("<i8")}
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        last = max((s["data_offsets"][1] for k, s in header.items() if k != "__metadata__"),
                   default=0)
        if 8 + n + last > size:
            raise ValueError(f"{size} bytes, the header promises {8 + n + last}")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise DatasleuthError(f"{path} is damaged ({e}); delete {path.parent} so the corpus "
                              "is packed again") from e
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        shape = tuple(spec["shape"])
        if end == begin:
            out[name] = np.zeros(shape, dtype=dtypes[spec["dtype"]])
        else:
            out[name] = np.memmap(path, dtype=dtypes[spec["dtype"]], mode="r",
                                  offset=8 + n + begin, shape=shape)
    return out


class _Packer:
    """Streams tokens into fixed-length rows on disk; keeps at most one batch in memory."""

    def __init__(self, workdir: Path, seq_len: int, pad: int) -> None:
        self.seq_len, self.pad = seq_len, pad
        self.ids_path, self.starts_path = workdir / "ids.bin", workdir / "starts.bin"
        self.ids_f = open(self.ids_path, "wb")  # noqa: SIM115 -- closed in finish()
        self.starts_f = open(self.starts_path, "wb")  # noqa: SIM115
        self.lengths: list[int] = []
        self.seg_path = workdir / "segments.parquet"
        self.seg_schema = pa.schema([(c, pa.int64()) for c in _SEGMENT_COLUMNS])
        self.seg_writer = pq.ParquetWriter(self.seg_path, self.seg_schema)
        self.pending: tuple[np.ndarray, ...] | None = None  # ids, starts, ends, ord, eos
        self.idx = np.zeros(0, dtype=np.int64)  # original doc index of ordinals idx_base..
        self.idx_base = 0
        self.n_docs = 0
        self.n_tokens = 0

    def add(self, batch: list[tuple[int, str]], tokenizer: Any, sep: int) -> None:
        ids, starts, ends, ords, eos = _tokenize(tokenizer, [t for _, t in batch], sep)
        new = (ids, starts, ends, ords + self.n_docs, eos)
        self.idx = np.append(self.idx, np.array([i for i, _ in batch], dtype=np.int64))
        self.n_docs += len(batch)
        if self.pending is not None:
            new = tuple(np.concatenate([a, b]) for a, b in zip(self.pending, new, strict=True))
        n_full = len(new[0]) // self.seq_len * self.seq_len
        if n_full:
            self._emit(tuple(a[:n_full] for a in new))
        rest = tuple(a[n_full:] for a in new)
        self.pending = rest if len(rest[0]) else None
        keep = int(rest[3][0]) if self.pending is not None else self.n_docs
        self.idx = self.idx[keep - self.idx_base:]  # forget documents fully written
        self.idx_base = keep

    def _emit(self, arrays: tuple[np.ndarray, ...]) -> None:
        ids, starts, ends, ords, eos = arrays
        L = self.seq_len
        n = len(ids)
        first_row = len(self.lengths)
        pos = np.arange(n)
        brk = np.ones(n, dtype=bool)
        brk[1:] = (ords[1:] != ords[:-1]) | (pos[1:] % L == 0)
        run_start = np.flatnonzero(brk)
        last = np.append(run_start[1:], n) - 1
        row = run_start // L
        tok_end = last + 1 - eos[last].astype(np.int64) - row * L
        doc = self.idx[ords[run_start] - self.idx_base]
        table = pa.table({
            "sequence": row + first_row, "doc_index": doc,
            "char_start": starts[run_start], "char_end": ends[last],
            "tok_start": run_start - row * L, "tok_end": tok_end,
        }, schema=self.seg_schema)
        self.seg_writer.write_table(table)
        tok_starts = np.where(eos, -1, starts)
        if n % L:  # the final, partial sequence
            padn = L - n % L
            ids = np.append(ids, np.full(padn, self.pad, dtype=np.int64))
            tok_starts = np.append(tok_starts, np.full(padn, -1, dtype=np.int64))
        self.ids_f.write(ids.astype("<i4").tobytes())
        self.starts_f.write(tok_starts.astype("<i4").tobytes())
        rows = len(ids) // L
        self.lengths.extend([L] * rows)
        if n % L:
            self.lengths[-1] = n % L
        self.n_tokens += n

    def finish(self) -> None:
        if self.pending is not None:
            self._emit(self.pending)
            self.pending = None
        self.ids_f.close()
        self.starts_f.close()
        self.seg_writer.close()


def pack_corpus(
    documents: Any,
    tokenizer: Any,
    seq_len: int = 512,
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 1000,
    progress: bool = True,
    separator_token_id: int | None = None,
    text_field: str = "text",
    streaming: bool = False,
) -> PackedCorpus:
    """Tokenise documents, join them with EOS and cut the stream into ``seq_len`` rows.

    ``documents``: corpus paths (a ``str``/``Path``, or a list of ``Path`` objects; read
    with :func:`load_documents`), a ``datasets`` Dataset/IterableDataset with a ``text``
    (or ``text_field``) column and optionally a ``doc_index`` column, or a sequence of
    document strings / dicts (a list of ``str`` is always texts, never paths). Tokenisation uses
    ``add_special_tokens=False``; the separator (``separator_token_id``, default the EOS
    token) follows *every* document, the last included. The last row is padded (pad
    token, else the separator) and its true length recorded. With ``output_dir`` the
    result is stored there (see the module docstring); without it, in a temporary
    directory removed when the object is garbage collected. Memory stays bounded by
    one batch of ``batch_size`` documents.
    """
    if seq_len < 1:
        raise DatasleuthError(f"seq_len must be a positive number of tokens, got {seq_len}")
    if not getattr(tokenizer, "is_fast", False):
        raise DatasleuthError(
            "packing needs a fast tokenizer (character offsets); load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    sep = _separator(tokenizer, separator_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    info = tokenizer_info(tokenizer)
    sources: list[str] | None = None
    if _is_paths(documents):  # streaming: read the files as they are, no Arrow cache copy
        documents = load_documents(documents, text_field=text_field, streaming=streaming)
    sources = getattr(documents, _SOURCES_ATTR, None)
    content = _ContentHash()

    cleanup = None
    if output_dir is None:
        out = Path(tempfile.mkdtemp(prefix="datasleuth-corpus-"))
        cleanup = out
    else:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / _METADATA).unlink(missing_ok=True)  # the old marker goes first
    work = Path(tempfile.mkdtemp(prefix=".packing-", dir=out))
    try:
        packer = _Packer(work, seq_len, pad)
        doc_schema = pa.schema([("doc_index", pa.int64()), ("text", pa.large_string())])
        with atomic_path(out / _DOCUMENTS) as doc_tmp:
            with pa.OSFile(str(doc_tmp), "wb") as sink, pa.ipc.new_file(sink, doc_schema) as docw:
                total = len(documents) if hasattr(documents, "__len__") else None
                bar = progress_bar(_iter_batches(documents, text_field, batch_size),
                                   desc="packing corpus", enabled=progress,
                                   total=None if total is None else -(-total // batch_size))
                for batch in bar:
                    for idx, text in batch:
                        content.update(idx, text)
                    docw.write_batch(pa.record_batch(
                        [pa.array([i for i, _ in batch], pa.int64()),
                         pa.array([t for _, t in batch], pa.large_string())], schema=doc_schema))
                    packer.add(batch, tokenizer, sep)
                packer.finish()
            if packer.n_docs == 0:
                raise DatasleuthError("the corpus holds no documents; add documents")
        n_rows = len(packer.lengths)
        lengths = np.asarray(packer.lengths, dtype=np.int32)
        _write_safetensors(out / _TOKENS, [
            ("input_ids", "I32", (n_rows, seq_len), packer.ids_path),
            ("lengths", "I32", (n_rows,), lengths),
        ], {"format": "datasleuth.corpus", "seq_len": str(seq_len)})
        _write_safetensors(out / _OFFSETS, [
            ("char_starts", "I32", (n_rows, seq_len), packer.starts_path),
        ], {"format": "datasleuth.corpus"})
        os.replace(packer.seg_path, out / _SEGMENTS)
        key = _source_key(sources) if sources is not None else "content:" + content.hexdigest()
        metadata = {
            "format": "datasleuth.corpus",
            "format_version": CORPUS_FORMAT_VERSION,
            "seq_len": seq_len,
            "num_sequences": n_rows,
            "num_tokens": packer.n_tokens,
            "num_documents": packer.n_docs,
            "separator_token_id": sep,
            "pad_token_id": int(pad),
            "eos_marker": EOS_MARKER,
            "text_field": text_field,
            "tokenizer": info,
            "source_paths": sources or [],
            "content_sha256": content.hexdigest(),
            "fingerprint": _fingerprint(key, info, seq_len, sep, text_field),
        }
        with atomic_path(out / _METADATA) as tmp:
            tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    except BaseException:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    corpus = PackedCorpus.load(out)
    if cleanup is not None:
        corpus._finalizer = weakref.finalize(corpus, shutil.rmtree, str(cleanup), True)
    return corpus


# --------------------------------------------------------------------------- reading back


class _TorchView(torch.utils.data.Dataset):
    """``torch.utils.data.Dataset`` over a :class:`PackedCorpus`; items are CONTRACT dicts."""

    def __init__(self, corpus: PackedCorpus) -> None:
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.corpus.item(i)


@dataclass
class _Arrays:
    input_ids: np.ndarray
    lengths: np.ndarray
    char_starts: np.ndarray
    seg_seq_ptr: np.ndarray  # (N+1,) row -> first segment
    segments: np.ndarray  # (S, 5): doc_index, char_start, char_end, tok_start, tok_end
    doc_rows: np.ndarray | None  # sorted doc_index values (None: doc_index == row)
    doc_order: np.ndarray | None
    documents: pa.Table


class PackedCorpus:
    """Fixed-length training sequences with pointers back to the documents they came from.

    Open with :meth:`load` or get one from :func:`pack_corpus`. Arrays are memory-mapped
    and opened lazily, so the object pickles cheaply into DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike, metadata: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.metadata = metadata
        self._arrays: _Arrays | None = None
        self._finalizer: Any = None

    # -- construction -------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike) -> PackedCorpus:
        """Open a packed corpus directory written by :func:`pack_corpus`."""
        d = Path(directory)
        meta_path = d / _METADATA
        if not meta_path.is_file():
            raise DatasleuthError(
                f"{d} is not a packed corpus (no {_METADATA}); pack it with pack_corpus or "
                "`datasleuth pack`"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DatasleuthError(
                f"{meta_path} is not valid JSON ({e.msg}); re-pack the corpus"
            ) from e
        if meta.get("format") != "datasleuth.corpus" or (
            meta.get("format_version") != CORPUS_FORMAT_VERSION
        ):
            raise DatasleuthError(
                f"{d} holds corpus format version {meta.get('format_version')}, this datasleuth "
                f"reads {CORPUS_FORMAT_VERSION}; re-pack the corpus"
            )
        for name in (_TOKENS, _OFFSETS, _SEGMENTS, _DOCUMENTS):
            if not (d / name).is_file():
                raise DatasleuthError(f"{d / name} is missing; re-pack the corpus")
        return cls(d, meta)

    @staticmethod
    def matches(
        directory: str | os.PathLike,
        documents: Any,
        tokenizer: Any,
        seq_len: int = 512,
        separator_token_id: int | None = None,
        text_field: str = "text",
    ) -> bool:
        """True when ``directory`` holds a complete packing of exactly these inputs."""
        meta_path = Path(directory) / _METADATA
        if not meta_path.is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            return False
        if meta.get("format_version") != CORPUS_FORMAT_VERSION:
            return False
        fp = corpus_fingerprint(documents, tokenizer, seq_len, separator_token_id, text_field)
        return meta.get("fingerprint") == fp

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "metadata": self.metadata}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["metadata"])

    @property
    def _a(self) -> _Arrays:
        if self._arrays is None:
            tok = _memmap_safetensors(self.directory / _TOKENS)
            off = _memmap_safetensors(self.directory / _OFFSETS)
            seg = pq.read_table(self.directory / _SEGMENTS)
            cols = [seg.column(c).to_numpy() for c in _SEGMENT_COLUMNS]
            n = len(tok["lengths"])
            ptr = np.searchsorted(cols[0], np.arange(n + 1), side="left")
            docs = pa.ipc.open_file(pa.memory_map(str(self.directory / _DOCUMENTS))).read_all()
            idx = docs.column("doc_index").to_numpy()
            if np.array_equal(idx, np.arange(len(idx))):
                rows = order = None
            else:
                order = np.argsort(idx, kind="stable")
                rows = idx[order]
            self._arrays = _Arrays(tok["input_ids"], tok["lengths"], off["char_starts"], ptr,
                                   np.stack(cols[1:], axis=1), rows, order, docs)
        return self._arrays

    # -- sequences ----------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return int(self.metadata["seq_len"])

    @property
    def num_documents(self) -> int:
        return int(self.metadata["num_documents"])

    @property
    def fingerprint(self) -> str:
        return str(self.metadata["fingerprint"])

    def __len__(self) -> int:
        return int(self.metadata["num_sequences"])

    def _check(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a corpus of {n} sequences")
        return i % n

    def input_ids(self, i: int) -> torch.Tensor:
        """Token ids of sequence ``i`` (LongTensor of shape (seq_len,), padded)."""
        return torch.from_numpy(np.asarray(self._a.input_ids[self._check(i)], dtype=np.int64))

    def length(self, i: int) -> int:
        """Number of real (non-padding) tokens in sequence ``i``."""
        return int(self._a.lengths[self._check(i)])

    def segments(self, i: int) -> list[Segment]:
        """The document pieces in sequence ``i``, in order."""
        i = self._check(i)
        a = self._a
        rows = a.segments[a.seg_seq_ptr[i]:a.seg_seq_ptr[i + 1]]
        return [Segment(*(int(v) for v in r)) for r in rows]

    def document_text(self, doc_index: int) -> str:
        """The original text of document ``doc_index``."""
        a = self._a
        if a.doc_rows is None:
            row = int(doc_index)
            ok = 0 <= row < a.documents.num_rows
        else:
            k = int(np.searchsorted(a.doc_rows, doc_index))
            ok = k < len(a.doc_rows) and a.doc_rows[k] == doc_index
            row = int(a.doc_order[k]) if ok else -1
        if not ok:
            raise DatasleuthError(f"document {doc_index} is not in this corpus; check the index")
        return a.documents.column("text")[row].as_py()

    def token_pieces(self, i: int) -> list[tuple[str, int, int]]:
        """``(piece, doc_index, char_start)`` for every real token of sequence ``i``.

        ``piece`` is the token's text as it appears in the original document: the
        characters from its start offset to the next token's start (so leading spaces go
        with the token before them and the pieces of a segment concatenate to exactly
        ``document_text(doc)[char_start:char_end]``). An EOS separator is shown as
        :data:`EOS_MARKER` (``"⏎"``) with ``char_start = -1`` and the doc_index of the
        document it ends. Padding is not included. (A document that tokenises to no
        tokens, e.g. only whitespace, has a segment but no pieces.)
        """
        i = self._check(i)
        n = self.length(i)
        starts = np.asarray(self._a.char_starts[i, :n], dtype=np.int64)
        out: list[tuple[str, int, int]] = []
        pos = 0
        for seg in self.segments(i):
            text = self.document_text(seg.doc_index)
            for t in range(seg.tok_start, seg.tok_end):
                s = int(starts[t])
                e = int(starts[t + 1]) if t + 1 < seg.tok_end else seg.char_end
                out.append((text[s:e], seg.doc_index, s))
            pos = seg.tok_end
            if pos < n and starts[pos] == -1:
                out.append((EOS_MARKER, seg.doc_index, -1))
                pos += 1
        return out

    def text(self, i: int) -> str:
        """Text of sequence ``i`` rebuilt from the original documents (EOS as ``"⏎"``)."""
        return "".join(p for p, _, _ in self.token_pieces(i))

    # -- torch ----------------------------------------------------------------------
    def item(self, i: int) -> dict[str, torch.Tensor]:
        """One training example as a dict of 1-D tensors (docs/CONTRACT.md)."""
        i = self._check(i)
        ids = self.input_ids(i)
        mask = (torch.arange(self.seq_len) < self.length(i)).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "index": torch.tensor(i, dtype=torch.long)}

    def as_torch_dataset(self) -> torch.utils.data.Dataset:
        """A ``torch.utils.data.Dataset`` whose items are :meth:`item` dicts."""
        return _TorchView(self)

    def collate(self, batch: Sequence[int | dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack sequence indices or :meth:`item` dicts into a CONTRACT batch dict.

        ``input_ids``/``attention_mask``/``labels`` are (B, seq_len) LongTensors, labels
        -100 on padding; ``index`` is (B,).
        """
        if len(batch) == 0:
            raise DatasleuthError("cannot collate an empty batch; pass at least one sequence")
        items = [b if isinstance(b, dict) else self.item(int(b)) for b in batch]
        return {k: torch.stack([it[k] for it in items]) for k in
                ("input_ids", "attention_mask", "labels", "index")}

    def __repr__(self) -> str:
        return (f"PackedCorpus({str(self.directory)!r}, sequences={len(self)}, "
                f"seq_len={self.seq_len}, documents={self.num_documents})")
