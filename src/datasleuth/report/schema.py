"""The results document of a trace: its schema and validation (docs/method.md §6).

The ``trace`` command writes a *results document* (``results.json``); this module
defines its schema and validates it (:func:`load_results`, :func:`validate_results`).

Schema (``format_version`` 1)::

    Results = {
        "format_version": 1, "tool": "datasleuth",
        "model": str, "corpus": str, "config": {str: JSON}, "created": ISO-8601 str,
        "warnings": [str],            # shown in a banner at the top
        "queries": [QueryResult],
    }
    QueryResult = {
        "id": str, "prompt": str, "completion": str, "completion_tokens": [str],
        "score_histogram": {"edges": [float] (n+1, non-decreasing), "counts": [int] (n)},
        "n_scanned": int,             # training sequences scored for this query
        "layer_names": [str],         # tracked layers, order of Sequence.layer_scores
        "top": [Sequence],            # most positive scores
        "bottom": [Sequence],         # most negative scores
        "tail_patch": TailPatch,      # optional (`datasleuth evaluate --tail-patch`, §10)
    }
    TailPatch = {
        "k": int (>= 1), "steps": int, "optimizer": str, "lr": float,
        "before": float,              # log p(completion | prompt) before patching
        "rows": [{"method": str, "gain": float | null,   # rise of log p after patching
                  "std": float | null, "draws": int | null}],  # random: sd over draws
    }
    Sequence = {
        "rank": int (>= 1), "index": int (row of the training sequence),
        "score": float,               # > 0: raises log p(completion | prompt)
        "layer_scores": [float],      # one per layer_names entry, or [] if not computed
        "documents": [{"doc_index": int, "char_start": int, "char_end": int}],
        "tokens": [str], "token_scores": [float] (same length as tokens),
        "spurious": bool,             # ||a||_2 / ||a||_1 > 2/3 (§6): one token carries it
        "token_offset_note": str,     # which token the heat is drawn on (§6)
    }

Unknown extra keys are ignored, so producers may add fields without breaking
older readers; a newer ``format_version`` is rejected with an upgrade hint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

from datasleuth.errors import DatasleuthError

__all__ = [
    "FORMAT_VERSION",
    "Document",
    "QueryResult",
    "Results",
    "ScoreHistogram",
    "SequenceResult",
    "load_results",
    "validate_results",
]

FORMAT_VERSION = 1


class Document(TypedDict):
    """A slice ``[char_start, char_end)`` of training document ``doc_index`` in a sequence."""

    doc_index: int
    char_start: int
    char_end: int


class SequenceResult(TypedDict):
    """One scored training sequence (an entry of ``top`` or ``bottom``)."""

    rank: int
    index: int
    score: float
    layer_scores: list[float]
    documents: list[Document]
    tokens: list[str]
    token_scores: list[float]
    spurious: bool
    token_offset_note: str


class ScoreHistogram(TypedDict):
    """Histogram of the scores of all scanned sequences: ``len(edges) == len(counts) + 1``."""

    edges: list[float]
    counts: list[int]


class QueryResult(TypedDict):
    """Results for one query (prompt + completion)."""

    id: str
    prompt: str
    completion: str
    completion_tokens: list[str]
    score_histogram: ScoreHistogram
    n_scanned: int
    layer_names: list[str]
    top: list[SequenceResult]
    bottom: list[SequenceResult]


class Results(TypedDict):
    """The whole results document written by ``datasleuth trace``."""

    format_version: int
    tool: str
    model: str
    corpus: str
    config: dict[str, Any]
    created: str
    warnings: list[str]
    queries: list[QueryResult]


# --------------------------------------------------------------------------- validation


def _fail(where: str, problem: str) -> DatasleuthError:
    return DatasleuthError(
        f"invalid results document: {where} {problem}; regenerate it with `datasleuth trace` "
        "or fix the file"
    )


def _get(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise _fail(f"{where}.{key}", "is missing")
    return obj[key]


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(where, f"must be an object, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(where, f"must be a list, got {type(value).__name__}")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, f"must be a string, got {type(value).__name__}")
    return value


def _int(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise _fail(where, f"must be >= {minimum}, got {value}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _fail(where, f"must be finite, got {value}")
    return float(value)


def _list_of(value: Any, where: str, item: Callable[[Any, str], Any]) -> list[Any]:
    return [item(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where))]


def _validate_sequence(seq: Any, where: str, n_layers: int) -> None:
    seq = _dict(seq, where)
    _int(_get(seq, "rank", where), f"{where}.rank", minimum=1)
    _int(_get(seq, "index", where), f"{where}.index", minimum=0)
    _float(_get(seq, "score", where), f"{where}.score")
    layer_scores = _list_of(_get(seq, "layer_scores", where), f"{where}.layer_scores", _float)
    if layer_scores and len(layer_scores) != n_layers:
        raise _fail(
            f"{where}.layer_scores",
            f"has {len(layer_scores)} entries but the query has {n_layers} layer_names",
        )
    for j, doc in enumerate(_list(_get(seq, "documents", where), f"{where}.documents")):
        dw = f"{where}.documents[{j}]"
        doc = _dict(doc, dw)
        _int(_get(doc, "doc_index", dw), f"{dw}.doc_index", minimum=0)
        start = _int(_get(doc, "char_start", dw), f"{dw}.char_start", minimum=0)
        end = _int(_get(doc, "char_end", dw), f"{dw}.char_end", minimum=0)
        if end < start:
            raise _fail(dw, f"has char_end {end} < char_start {start}")
    tokens = _list_of(_get(seq, "tokens", where), f"{where}.tokens", _str)
    scores = _list_of(_get(seq, "token_scores", where), f"{where}.token_scores", _float)
    if len(tokens) != len(scores):
        raise _fail(f"{where}.token_scores", f"has {len(scores)} entries for {len(tokens)} tokens")
    if not isinstance(_get(seq, "spurious", where), bool):
        raise _fail(f"{where}.spurious", "must be true or false")
    _str(_get(seq, "token_offset_note", where), f"{where}.token_offset_note")


def _validate_histogram(hist: Any, where: str) -> None:
    hist = _dict(hist, where)
    edges = _list_of(_get(hist, "edges", where), f"{where}.edges", _float)
    counts = _list_of(
        _get(hist, "counts", where), f"{where}.counts", lambda v, w: _int(v, w, minimum=0)
    )
    if len(edges) != len(counts) + 1:
        raise _fail(
            f"{where}.edges",
            f"has {len(edges)} entries but needs len(counts) + 1 = {len(counts) + 1}",
        )
    if any(b < a for a, b in zip(edges, edges[1:], strict=False)):
        raise _fail(f"{where}.edges", "must be non-decreasing")


def _optional_float(value: Any, where: str) -> float | None:
    return None if value is None else _float(value, where)


def _validate_tail_patch(patch: Any, where: str) -> None:
    patch = _dict(patch, where)
    _int(_get(patch, "k", where), f"{where}.k", minimum=1)
    _float(_get(patch, "before", where), f"{where}.before")
    for key in ("steps", "lr"):
        if key in patch:
            _float(patch[key], f"{where}.{key}")
    for j, row in enumerate(_list(_get(patch, "rows", where), f"{where}.rows")):
        rw = f"{where}.rows[{j}]"
        row = _dict(row, rw)
        _str(_get(row, "method", rw), f"{rw}.method")
        _optional_float(_get(row, "gain", rw), f"{rw}.gain")
        _optional_float(row.get("std"), f"{rw}.std")


def _validate_query(query: Any, where: str) -> None:
    query = _dict(query, where)
    for key in ("id", "prompt", "completion"):
        _str(_get(query, key, where), f"{where}.{key}")
    _list_of(_get(query, "completion_tokens", where), f"{where}.completion_tokens", _str)
    _validate_histogram(_get(query, "score_histogram", where), f"{where}.score_histogram")
    _int(_get(query, "n_scanned", where), f"{where}.n_scanned", minimum=0)
    names = _list_of(_get(query, "layer_names", where), f"{where}.layer_names", _str)
    for part in ("top", "bottom"):
        for i, seq in enumerate(_list(_get(query, part, where), f"{where}.{part}")):
            _validate_sequence(seq, f"{where}.{part}[{i}]", len(names))
    if query.get("tail_patch") is not None:
        _validate_tail_patch(query["tail_patch"], f"{where}.tail_patch")


def validate_results(results: Any) -> Results:
    """Check ``results`` against the schema above; return it unchanged (typed).

    Raises :class:`DatasleuthError` with a one-line message naming the bad field.
    """
    doc = _dict(results, "the document")
    version = _int(_get(doc, "format_version", "results"), "results.format_version")
    if version > FORMAT_VERSION:
        raise DatasleuthError(
            f"results format_version {version} is newer than this datasleuth supports "
            f"({FORMAT_VERSION}); upgrade datasleuth"
        )
    if version != FORMAT_VERSION:
        raise _fail("results.format_version", f"must be {FORMAT_VERSION}, got {version}")
    tool = _str(_get(doc, "tool", "results"), "results.tool")
    if tool != "datasleuth":
        raise _fail("results.tool", f"must be 'datasleuth', got {tool!r}")
    for key in ("model", "corpus"):
        _str(_get(doc, key, "results"), f"results.{key}")
    _dict(_get(doc, "config", "results"), "results.config")
    created = _str(_get(doc, "created", "results"), "results.created")
    try:
        datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        raise _fail("results.created", f"is not an ISO-8601 timestamp: {created!r}") from None
    _list_of(_get(doc, "warnings", "results"), "results.warnings", _str)
    for i, query in enumerate(_list(_get(doc, "queries", "results"), "results.queries")):
        _validate_query(query, f"results.queries[{i}]")
    return doc  # type: ignore[return-value]


def load_results(path: str | os.PathLike[str]) -> Results:
    """Read and validate a ``results.json`` file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasleuthError(
            f"results file {p} not found; run `datasleuth trace` first or check the path"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasleuthError(f"cannot read results file {p} ({exc}); check the file") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasleuthError(
            f"results file {p} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg}); regenerate it with `datasleuth trace`"
        ) from None
    return validate_results(doc)
