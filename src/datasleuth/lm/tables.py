"""Trace results as a table people can open: ``results.parquet``.

One row per (query, list, rank, document piece) of a trace's results document -- the
same numbers as ``results.json``, flat, so that ``pandas.read_parquet`` loads it as is.
Written atomically (:mod:`datasleuth.storage`), with the user's umask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datasleuth.lm.corpus import PackedCorpus
from datasleuth.storage import atomic_path

__all__ = ["RESULT_COLUMNS", "results_table", "write_results_table", "write_table"]

#: Columns of the long results table, in order; the corpus's own document columns
#: (``id``, ``title``, ``source``...) follow ``doc_index`` where the corpus has them.
RESULT_COLUMNS = ("query_id", "method", "list", "rank", "score", "sequence", "doc_index",
                  "char_start", "char_end", "text")
_TYPES = {"query_id": pa.string(), "method": pa.string(), "list": pa.string(),
          "rank": pa.int32(), "score": pa.float64(), "sequence": pa.int64(),
          "doc_index": pa.int64(), "char_start": pa.int64(), "char_end": pa.int64(),
          "text": pa.large_string()}


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as Parquet at ``path``, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))
    return path


def _method(results: dict[str, Any]) -> str:
    curvature = (results.get("config") or {}).get("curvature") or {}
    return str(curvature.get("curvature", "influence")) if isinstance(curvature, dict) \
        else "influence"


def results_table(results: dict[str, Any], corpus: PackedCorpus) -> pa.Table:
    """The long table of a trace's results document (columns :data:`RESULT_COLUMNS`).

    ``list`` is ``top`` (most positive first) or ``bottom`` (most negative first);
    ``text`` is the document's characters ``char_start:char_end`` that lie in the
    sequence. A sequence cut from several documents gives one row per document.
    """
    fields = corpus.document_field_names
    columns: dict[str, list[Any]] = {c: [] for c in RESULT_COLUMNS[:7] + tuple(fields)
                                     + RESULT_COLUMNS[7:]}
    method = _method(results)
    for query in results["queries"]:
        for which in ("top", "bottom"):
            for row in query.get(which, []):
                for doc in row["documents"]:
                    start, end = int(doc["char_start"]), int(doc["char_end"])
                    values = {"query_id": str(query["id"]), "method": method, "list": which,
                              "rank": int(row["rank"]), "score": float(row["score"]),
                              "sequence": int(row["index"]), "doc_index": int(doc["doc_index"]),
                              "char_start": start, "char_end": end,
                              "text": corpus.document_text(doc["doc_index"])[start:end]}
                    for f in fields:
                        values[f] = doc.get(f)
                    for c, v in values.items():
                        columns[c].append(v)
    return pa.table({c: pa.array(v, _TYPES.get(c, pa.string())) for c, v in columns.items()})


def write_results_table(results: dict[str, Any], corpus: PackedCorpus, path: str | Path
                        ) -> Path:
    """Write :func:`results_table` to ``path`` (``OUT/results.parquet``)."""
    return write_table(results_table(results, corpus), path)
