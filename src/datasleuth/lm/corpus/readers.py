"""Read corpus documents: files, folders, JSON Lines, Parquet, Arrow and text, streamed or not.

:func:`load_documents` turns user paths into a ``datasets`` Dataset with ``text`` and
``doc_index`` columns; :func:`iter_batches` walks any accepted document source (paths
already read, a Dataset/IterableDataset, strings or dicts) as ``(doc_index, text)``
batches for fingerprinting and packing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datasleuth.errors import DatasleuthError

__all__ = ["load_documents"]

_KINDS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet",
          ".arrow": "arrow"}
#: Attribute of a dataset from :func:`load_documents` listing its source files.
SOURCES_ATTR = "_datasleuth_sources"


def is_paths(documents: Any) -> bool:
    """True when ``documents`` names corpus files (a str/Path, or a list of Paths)."""
    if isinstance(documents, (str, os.PathLike)):
        return True
    return (isinstance(documents, (list, tuple)) and len(documents) > 0
            and all(isinstance(d, os.PathLike) for d in documents))


def expand_paths(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
) -> list[tuple[str, list[Path]]]:
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


def check_columns(columns: Sequence[str] | None, text_field: str, where: str) -> None:
    """Refuse a source whose ``columns`` lack ``text_field``."""
    if columns is not None and text_field not in columns:
        raise DatasleuthError(
            f"{where} has no field {text_field!r} (fields: {', '.join(columns) or 'none'}); "
            "pass the right one with --text-field (text_field= in Python)"
        )



def _load_saved(folder: Path, text_field: str, streaming: bool) -> Any:
    """A ``datasets`` ``save_to_disk`` folder (one split) as a Dataset."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise DatasleuthError(
            f"could not read the saved dataset {folder} ({e}); re-save it with save_to_disk"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if list(ds) == ["train"] or len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DatasleuthError(
                f"{folder} holds several splits ({', '.join(ds)}); point to one split's "
                "folder instead"
            )
    check_columns(ds.column_names, text_field, str(folder))
    return ds.to_iterable_dataset() if streaming else ds


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
    empty = [f for f in files if kind == "json" and f.stat().st_size == 0]
    if empty:
        raise DatasleuthError(f"{empty[0]} is empty; add documents to it or leave it out")


def _load_group(kind: str, files: list[Path], text_field: str, streaming: bool,
                cache_dir: str | None) -> Any:
    """One group of files of one kind as a Dataset (IterableDataset when ``streaming``)."""
    import datasets

    where = str(files[0]) if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more)"
    if kind == "disk":
        return _load_saved(files[0], text_field, streaming)
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
        raise DatasleuthError(f"could not read {where} ({e}); check the file format") from e
    if streaming and kind == "json":
        ds = datasets.IterableDataset.from_generator(
            _guarded, gen_kwargs={"source": ds, "files": files, "text_field": text_field}
        )
    columns = ds.column_names
    if columns is None and streaming:
        first = next(iter(ds), None)
        columns = list(first) if first is not None else []
    check_columns(columns, text_field, where)
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

    groups = expand_paths(paths)
    cache = str(cache_dir) if cache_dir is not None else None
    parts = [_text_column(_load_group(kind, files, text_field, streaming, cache), kind, files,
                          text_field, streaming) for kind, files in groups]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    sources = [str(f.resolve()) for _, files in groups for f in files]
    ds = _with_doc_index(ds, sources[0], text_field, streaming)
    setattr(ds, SOURCES_ATTR, sources)  # read back by corpus_fingerprint / pack_corpus
    return ds


def _text_column(ds: Any, kind: str, files: list[Path], text_field: str, streaming: bool) -> Any:
    """Keep only the text field of one group, named ``text``; refuse non-text fields."""
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


def iter_batches(
    documents: Any, text_field: str, batch_size: int
) -> Iterator[list[tuple[int, str]]]:
    """Yield lists of (doc_index, text) from a Dataset, IterableDataset or sequence."""
    import datasets

    if isinstance(documents, datasets.Dataset):
        has_index = "doc_index" in documents.column_names
        field = "text" if "text" in documents.column_names else text_field
        check_columns(documents.column_names, field, "the documents")
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

