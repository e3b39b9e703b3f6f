"""Read corpus documents: files, folders, datasets names and objects, streamed or not.

:func:`load_documents` turns corpus references -- JSON Lines, Parquet, Arrow and text
files, folders of them, ``save_to_disk`` folders, ``datasets`` names (resolved from the
local caches, :mod:`datasleuth.lm.hub`) and ``datasets.Dataset`` objects -- into one
``datasets`` Dataset with ``text`` and ``doc_index`` columns, plus the corpus's own
``id``/``title``/``source``-like columns where every part has them
(:data:`DOCUMENT_FIELDS`). :func:`iter_batches` walks any accepted document source as
``(doc_index, text)`` batches (:class:`DocumentBatch`, which also carries those columns)
for fingerprinting and packing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasleuth.errors import DatasleuthError
from datasleuth.lm.corpus.textfiles import file_digest, json_lines, scan_text

__all__ = ["load_documents", "DOCUMENT_FIELDS", "DocumentBatch"]

#: Columns of a corpus kept beside the text (as strings) to name documents in results.
DOCUMENT_FIELDS = ("id", "doc_id", "title", "source", "url")
_KINDS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet",
          ".arrow": "arrow"}
#: Attribute of a dataset from :func:`load_documents` listing its source files.
SOURCES_ATTR = "_datasleuth_sources"


def _is_dataset(item: Any) -> bool:
    import datasets

    return isinstance(item, (datasets.Dataset, datasets.IterableDataset))


def is_paths(documents: Any) -> bool:
    """True when ``documents`` names corpus files or datasets (a str/Path, or a list of
    Paths and ``datasets`` objects, at least one of them a Path)."""
    if isinstance(documents, (str, os.PathLike)):
        return True
    return (isinstance(documents, (list, tuple)) and len(documents) > 0
            and all(isinstance(d, os.PathLike) or _is_dataset(d) for d in documents)
            and any(isinstance(d, os.PathLike) for d in documents))


def has_names(documents: Any) -> bool:
    """True when corpus references include something other than existing files or folders
    (a ``datasets`` name or object), so that they must be read to be fingerprinted."""
    if not is_paths(documents):
        return False
    items = [documents] if isinstance(documents, (str, os.PathLike)) else documents
    return any(not isinstance(d, (str, os.PathLike)) or not Path(d).exists() for d in items)


def _missing(raw: str | os.PathLike) -> tuple[str, Any]:
    """A reference that is not on disk: a ``datasets`` name, else a missing path."""
    from datasleuth.lm.hub import looks_like_hub_id

    text = os.fspath(raw)
    if Path(text).suffix.lower() not in _KINDS and looks_like_hub_id(text):
        return "hub", text
    raise DatasleuthError(f"corpus path {text} does not exist; check the path (or give a "
                          "datasets name such as owner/name)")


def expand_paths(
    paths: str | os.PathLike | Sequence[Any],
) -> list[tuple[str, list[Any]]]:
    """Resolve corpus references into consecutive groups of (kind, items) in the given order.

    Kinds: the file kinds of :data:`_KINDS` (items are Paths), ``disk`` (a save_to_disk
    folder), ``hub`` (a ``datasets`` name) and ``memory`` (a ``datasets`` object).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 0:
        raise DatasleuthError("no corpus paths given; pass at least one file or directory")
    items: list[tuple[str, Any]] = []
    for raw in paths:
        if _is_dataset(raw):
            items.append(("memory", raw))
            continue
        p = Path(raw)
        if not p.exists():
            items.append(_missing(raw))
            continue
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
    groups: list[tuple[str, list[Any]]] = []
    for kind, p in items:
        if groups and groups[-1][0] == kind and kind in _KINDS.values():
            groups[-1][1].append(p)
        else:
            groups.append((kind, [p]))
    return groups


def _scan_json(files: Sequence[Path], text_field: str) -> None:
    """Find the first malformed record in JSON/JSONL files and raise a precise error."""
    for f in files:
        if f.suffix.lower() == ".json":
            try:
                scan_text([f])
                json.loads(f.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise DatasleuthError(
                    f"{f}:{e.lineno}: malformed JSON ({e.msg}); fix the file (or use JSON Lines, "
                    "one object per line)"
                ) from e
            continue
        for lineno, obj in json_lines(f, "fix or remove that line", "JSON line"):
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


def check_columns(columns: Sequence[str] | None, text_field: str, where: str) -> None:
    """Refuse a source whose ``columns`` lack ``text_field``."""
    if columns is not None and text_field not in columns:
        raise DatasleuthError(
            f"{where} has no field {text_field!r} (fields: {', '.join(columns) or 'none'}); "
            "pass the right one with --text-field (text_field= in Python)"
        )



def _load_saved(folder: Path, text_field: str, streaming: bool, split: str | None) -> Any:
    """A ``datasets`` ``save_to_disk`` folder (one split, chosen by ``split``) as a Dataset."""
    import datasets

    from datasleuth.lm.hub import one_split

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise DatasleuthError(
            f"could not read the saved dataset {folder} ({e}); re-save it with save_to_disk"
        ) from e
    ds = one_split(ds, split, str(folder))
    check_columns(ds.column_names, text_field, str(folder))
    return ds.to_iterable_dataset() if streaming else ds


def _cache_files(ds: Any) -> list[str] | None:
    """The Arrow files behind a Dataset (its identity on disk); ``None`` if in memory."""
    files = [f["filename"] for f in getattr(ds, "cache_files", None) or []]
    return [str(Path(f).resolve()) for f in files] or None


def _check_not_empty(kind: str, files: list[Path]) -> None:
    """Refuse empty Parquet and JSON files before ``datasets`` reports them obscurely."""
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
    empty = [f for f in files if kind == "json" and _blank(f)]
    if empty:
        raise DatasleuthError(f"{empty[0]} is empty; add documents to it or leave it out")


def _blank(path: Path) -> bool:
    """Whether the file holds only whitespace; reads up to its first other byte."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _load_group(kind: str, files: list[Any], text_field: str, streaming: bool,
                cache_dir: str | None, source: _Source) -> tuple[Any, list[str] | None]:
    """One group of one kind as a Dataset (IterableDataset when ``streaming``) and the
    files that identify it (``None``: identified by its content)."""
    if kind == "disk":
        ds = _load_saved(files[0], text_field, streaming, source.split)
        return ds, (None if streaming else _cache_files(ds)) or [str(files[0].resolve())]
    if kind in ("hub", "memory"):
        if kind == "hub":
            from datasleuth.lm.hub import load_hub_dataset

            ds = load_hub_dataset(files[0], config=source.config, split=source.split,
                                  streaming=streaming, download=source.download)
        else:
            ds = files[0].to_iterable_dataset() if streaming and hasattr(
                files[0], "to_iterable_dataset") else files[0]
        where = f"dataset {files[0]}" if kind == "hub" else "the datasets object"
        check_columns(_column_names(ds), text_field, where)
        return ds, (None if kind == "memory" or streaming else _cache_files(ds))
    return _load_files(kind, files, text_field, streaming, cache_dir), \
        [str(f.resolve()) for f in files]


def _column_names(ds: Any) -> list[str]:
    columns = ds.column_names
    if columns is None:  # a streamed dataset: look at its first row
        first = next(iter(ds), None)
        columns = list(first) if first is not None else []
    return list(columns)


def _load_files(kind: str, files: list[Path], text_field: str, streaming: bool,
                cache_dir: str | None) -> Any:
    """Files of one kind as one Dataset (IterableDataset when ``streaming``)."""
    import datasets

    where = str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"
    if not streaming:  # datasets keys its Arrow cache by path and mtime: key it by content
        content = hashlib.blake2b("|".join(file_digest(f) for f in files).encode(),
                                  digest_size=8).hexdigest()
        cache_dir = str(Path(cache_dir or datasets.config.HF_DATASETS_CACHE)
                        / "datasleuth-content" / content)
    kwargs: dict[str, Any] = {"data_files": [str(f) for f in files], "split": "train",
                              "streaming": streaming, "cache_dir": cache_dir}
    if kind == "text":
        kwargs["sample_by"] = "document"
        text_field = "text"
    _check_not_empty(kind, files)
    try:
        ds = datasets.load_dataset(kind, **kwargs)
    except Exception as e:
        if kind == "json" and not streaming:  # name the malformed line if there is one
            _scan_json(files, text_field)
        if kind == "text":
            scan_text(files)
        raise DatasleuthError(f"could not read {where} ({e}); check the file format") from e
    if streaming and kind == "json":
        ds = datasets.IterableDataset.from_generator(
            _guarded, gen_kwargs={"source": ds, "files": files, "text_field": text_field}
        )
    check_columns(_column_names(ds), text_field, where)
    return ds


def _guarded(source: Iterable[dict], files: list[Path], text_field: str) -> Iterator[dict]:
    """Iterate a streaming JSON dataset, turning parse errors into file:line errors."""
    try:
        yield from source
    except Exception as e:
        _scan_json(files, text_field)
        raise DatasleuthError(f"could not read {files[0]} ({e}); check the file format") from e


@dataclass(frozen=True)
class _Source:
    """How ``datasets`` names and multi-split folders are read."""

    split: str | None = None
    config: str | None = None
    download: bool = False


def load_documents(
    paths: str | os.PathLike | Sequence[Any],
    text_field: str = "text",
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    dataset_config: str | None = None,
    download: bool = False,
) -> Any:
    """Read a text corpus with the ``datasets`` library.

    Accepts JSON Lines / JSON files (``text_field`` holds the text), ``.txt`` files (one
    file = one document; newlines are normalised to ``\\n``), Parquet, Arrow (``.arrow``
    files and ``save_to_disk`` folders), directories of such files (sorted, recursive),
    ``datasets`` names (``owner/name``: read from the local caches, from the Hub only
    with ``download``; ``dataset_config`` names the configuration) and
    ``datasets.Dataset`` objects. ``split`` picks the split of a name or of a
    multi-split ``save_to_disk`` folder (default: its only split). Returns a
    memory-mapped ``datasets.Dataset`` (or an ``IterableDataset`` when ``streaming``)
    with the columns ``text``, ``doc_index`` -- the document's position in the corpus
    in reading order (references in the given order, files within a directory sorted),
    the index every result refers back to -- and those of :data:`DOCUMENT_FIELDS` that
    every part of the corpus has (as strings).
    """
    import datasets

    groups = expand_paths(paths)
    cache = str(cache_dir) if cache_dir is not None else None
    source = _Source(split, dataset_config, download)
    loaded = [_load_group(kind, items, text_field, streaming, cache, source)
              for kind, items in groups]
    fields = [f for f in DOCUMENT_FIELDS if f != text_field
              and all(f in _column_names(ds) for ds, _ in loaded)]
    parts = [_text_column(ds, kind, items, text_field, streaming, fields)
             for (kind, items), (ds, _) in zip(groups, loaded, strict=True)]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    first = groups[0][1][0]
    ds = _with_doc_index(ds, first if isinstance(first, (str, Path)) else "given", text_field,
                         streaming)
    if all(files is not None for _, files in loaded):
        # read back by corpus_fingerprint / pack_corpus; absent: identified by content
        setattr(ds, SOURCES_ATTR, [f for _, files in loaded for f in files])
    return ds


def _text_column(ds: Any, kind: str, items: list[Any], text_field: str, streaming: bool,
                 fields: Sequence[str] = ()) -> Any:
    """Keep the text field of one group, named ``text``, and ``fields`` as strings;
    refuse non-text fields."""
    import datasets

    field = "text" if kind == "text" else text_field
    ds = ds.select_columns([field] + [f for f in fields if kind != "text"])
    if field != "text":
        ds = ds.rename_column(field, "text")
    if not streaming:
        feature = ds.features["text"]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            if kind == "json":
                _scan_json(items, field)  # names the offending line
            raise DatasleuthError(
                f"field {field!r} in {items[0]} holds {feature}, not text; pick the text "
                "field with text_field"
            )
        for f in fields:
            if getattr(ds.features[f], "dtype", None) not in ("string", "large_string"):
                ds = ds.cast_column(f, datasets.Value("string"))
    return ds


def _with_doc_index(ds: Any, first_source: str, text_field: str, streaming: bool) -> Any:
    """Add the ``doc_index`` column (reading order); refuse empty corpora and null texts."""
    if streaming:
        first = next(iter(ds), None)
        if first is None:
            raise DatasleuthError(f"the corpus {first_source} holds no documents; add documents")
        return ds.map(lambda ex, i: {"doc_index": i}, with_indices=True)
    if len(ds) == 0:
        raise DatasleuthError(f"the corpus {first_source} holds no documents; add documents")
    column = ds.data.column("text")
    if column.null_count:
        bad = pc.index(pc.is_null(column), True).as_py()
        raise DatasleuthError(
            f"document {bad} of the corpus has no {text_field!r} value (null); give every "
            "document a text or drop it"
        )
    return ds.add_column("doc_index", np.arange(len(ds), dtype=np.int64))


class DocumentBatch(list):
    """``(doc_index, text)`` pairs of consecutive documents; ``fields`` holds the corpus's
    own columns of :data:`DOCUMENT_FIELDS` for the same documents (strings or ``None``)."""

    def __init__(self, pairs: list[tuple[int, str]], fields: dict[str, list[str | None]]):
        super().__init__(pairs)
        self.fields = fields


def _field_value(value: Any) -> str | None:
    return None if value is None else str(value)


def iter_batches(
    documents: Any, text_field: str, batch_size: int
) -> Iterator[DocumentBatch]:
    """Yield :class:`DocumentBatch` lists of (doc_index, text) from a Dataset,
    IterableDataset or sequence of strings/dicts; text that is not UTF-8 is refused
    naming the file and line where the documents came from files."""
    try:
        yield from _batches(documents, text_field, batch_size)
    except UnicodeDecodeError as e:
        files = [Path(f) for f in getattr(documents, SOURCES_ATTR, None) or []]
        scan_text([f for f in files if f.suffix.lower() not in (".parquet", ".arrow")
                    and f.is_file()])
        raise DatasleuthError(f"the corpus holds text that is not valid UTF-8 ({e.reason} at "
                              f"byte {e.start}); re-save it as UTF-8") from None


def _batches(documents: Any, text_field: str, batch_size: int) -> Iterator[DocumentBatch]:
    import datasets

    if isinstance(documents, datasets.Dataset):
        has_index = "doc_index" in documents.column_names
        field = "text" if "text" in documents.column_names else text_field
        check_columns(documents.column_names, field, "the documents")
        names = [f for f in DOCUMENT_FIELDS if f in documents.column_names and f != field]
        for start in range(0, len(documents), batch_size):
            rows = documents[start:start + batch_size]
            idx = rows["doc_index"] if has_index else range(start, start + len(rows[field]))
            yield DocumentBatch(_validated(list(zip(idx, rows[field], strict=True))),
                                {f: [_field_value(v) for v in rows[f]] for f in names})
        return
    yield from _iter_items(documents, text_field, batch_size)


def _iter_items(documents: Any, text_field: str, batch_size: int) -> Iterator[DocumentBatch]:
    """Batches of an IterableDataset or a sequence of strings/dicts."""
    batch: list[tuple[int, str]] = []
    names: list[str] | None = None
    fields: dict[str, list[str | None]] = {}
    for pos, item in enumerate(documents):
        if isinstance(item, str):
            batch.append((pos, item))
            item = {}
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
        if names is None:  # the first document decides which columns are kept
            names = [f for f in DOCUMENT_FIELDS if f in item and f != text_field]
            fields = {f: [] for f in names}
        for f in names:
            fields[f].append(_field_value(item.get(f)))
        if len(batch) >= batch_size:
            yield DocumentBatch(_validated(batch), fields)
            batch, fields = [], {f: [] for f in names}
    if batch:
        yield DocumentBatch(_validated(batch), fields)


def _validated(batch: list[tuple[int, Any]]) -> list[tuple[int, str]]:
    for idx, text in batch:
        if not isinstance(text, str):
            raise DatasleuthError(
                f"document {idx} has no text ({type(text).__name__}); give every document a "
                "string text or drop it"
            )
    return [(int(i), t) for i, t in batch]

