"""Self-contained HTML report of influence results (METHOD.md §6).

The ``trace`` command writes a *results document* (``results.json``); this module
defines its schema, validates it (:func:`load_results`, :func:`validate_results`)
and renders it into ONE offline HTML file (:func:`render_report`): inline CSS,
inline SVG charts built from numbers only, one small inline script (allowed by
hash in the page's Content-Security-Policy), no external resources.

Every piece of user-derived text (training tokens, prompt, completion, model
name, warnings, config) goes through Jinja2 autoescaping; the template never
marks such text ``|safe``.

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

import base64
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from datasleuth.errors import DatasleuthError
from datasleuth.storage import write_text

__all__ = [
    "FORMAT_VERSION",
    "Document",
    "QueryResult",
    "Results",
    "ScoreHistogram",
    "SequenceResult",
    "load_results",
    "render_report",
    "validate_results",
]

FORMAT_VERSION = 1
SPURIOUS_RATIO = 2.0 / 3.0  # METHOD.md §6: ||a||_2 / ||a||_1 above this flags one-token sequences

_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
_TEMPLATE_NAME = "report.html"


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


# --------------------------------------------------------------------------- view model

# Visible stand-ins for whitespace and control characters inside tokens.
_WS_SYMBOLS = {"\t": "⇥", "\r": "␍", "\v": "␋", "\f": "␌"}
_CONTROL = re.compile(r"([\x00-\x1f\x7f])")


def _fmt(x: float) -> str:
    """Signed, compact score for display (exact value goes in tooltips)."""
    return f"{x:+.4g}"


def _num(x: float) -> str:
    """SVG coordinate."""
    return f"{x:.2f}"


def _token_segments(token: str) -> str | list[tuple[str, str]]:
    """Display form of a token: the token itself when it has no control characters, else
    ``(kind, text)`` runs: ``t`` text, ``ws`` visible symbol, ``nl`` symbol + line break."""
    if token and not _CONTROL.search(token):
        return token
    segs: list[tuple[str, str]] = []
    for part in _CONTROL.split(token):
        if not part:
            continue
        if part == "\n":
            segs.append(("nl", "⏎"))
        elif _CONTROL.fullmatch(part):
            code = ord(part)
            symbol = _WS_SYMBOLS.get(part, chr(0x2421 if code == 0x7F else 0x2400 + code))
            segs.append(("ws", symbol))
        else:
            segs.append(("t", part))
    return segs or [("ws", "∅")]


# A heat-map cell: (css classes, background alpha, tooltip, display form of the token).
HeatCell = tuple[str, str, str, "str | list[tuple[str, str]]"]


def _heat_tokens(tokens: list[str], scores: list[float]) -> list[HeatCell]:
    """Token cells with sign class and intensity ``|s| / max|s|`` within the sequence."""
    peak = max((abs(s) for s in scores), default=0.0)
    cells: list[HeatCell] = []
    for i, (tok, s) in enumerate(zip(tokens, scores, strict=True)):
        intensity = abs(s) / peak if peak > 0 else 0.0
        sign = "pos" if s > 0 else "neg" if s < 0 else "zero"
        if intensity > 0.6:
            sign += " strong"
        if peak > 0 and abs(s) == peak:
            sign += " peak"
        alpha = f"{0.08 + 0.77 * intensity:.3f}" if s != 0 else "0"
        title = f"token {i}: score {float(s)!r} ({100 * intensity:.0f}% of max |score|)"
        cells.append((sign, alpha, title, _token_segments(tok)))
    return cells


def _concentration(scores: list[float]) -> float:
    """``||a||_2 / ||a||_1`` of token scores (METHOD.md §6); 0 for an all-zero vector."""
    l1 = sum(abs(s) for s in scores)
    return math.sqrt(sum(s * s for s in scores)) / l1 if l1 > 0 else 0.0


def _layer_chart(values: list[float], width: float = 240.0, height: float = 72.0) -> dict:
    """Signed bar chart geometry: bars up (positive) / down (negative) from a zero line."""
    n = len(values)
    pad = 2.0
    mid = height / 2
    peak = max((abs(v) for v in values), default=0.0)
    step = (width - 2 * pad) / max(n, 1)
    gap = 0.15 * step if step > 3 else 0.0
    bars = []
    for i, v in enumerate(values):
        h = (abs(v) / peak) * (mid - pad) if peak > 0 else 0.0
        bars.append(
            {
                "x": _num(pad + i * step + gap / 2),
                "y": _num(mid - h if v > 0 else mid),
                "w": _num(max(step - gap, 0.5)),
                "h": _num(h),
                "cls": "pos" if v > 0 else "neg",
                "title": f"layer {i}: {_fmt(v)}",
            }
        )
    return {
        "width": _num(width),
        "height": _num(height),
        "mid": _num(mid),
        "bars": bars,
        "peak": _fmt(peak).lstrip("+"),
    }


def _histogram_chart(
    edges: list[float], counts: list[int], top: list[float], bottom: list[float]
) -> dict:
    """Histogram geometry on a log10(1 + count) axis, with markers for the shown sequences."""
    width, height = 560.0, 170.0
    left, right, plot_top, base = 44.0, 12.0, 14.0, 140.0
    lo, hi = (edges[0], edges[-1]) if edges else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo

    def x_of(v: float) -> float:
        v = min(max(v, lo), hi)
        return left + (v - lo) / span * (width - left - right)

    cmax = max(counts, default=0)
    ymax = math.log10(1 + cmax) if cmax > 0 else 1.0
    bars = []
    for i, c in enumerate(counts):
        x0, x1 = x_of(edges[i]), x_of(edges[i + 1])
        h = math.log10(1 + c) / ymax * (base - plot_top)
        bars.append(
            {
                "x": _num(x0),
                "w": _num(max(x1 - x0 - 0.4, 0.4)),
                "y": _num(base - h),
                "h": _num(h),
                "title": f"[{_fmt(edges[i])}, {_fmt(edges[i + 1])}): {c} sequences",
            }
        )
    marks = [
        {"x": _num(x_of(s)), "cls": cls, "title": f"{label} #{r}: {_fmt(s)}"}
        for cls, label, scores in (("pos", "top", top), ("neg", "bottom", bottom))
        for r, s in enumerate(scores, start=1)
    ]
    ticks = [
        {"x": _num(x_of(lo)), "label": _fmt(lo), "anchor": "start"},
        {"x": _num(x_of(hi)), "label": _fmt(hi), "anchor": "end"},
    ]
    if lo < 0 < hi:
        ticks.append({"x": _num(x_of(0.0)), "label": "0", "anchor": "middle"})
    return {
        "width": _num(width),
        "height": _num(height),
        "left": _num(left),
        "right": _num(width - right),
        "top": _num(plot_top),
        "base": _num(base),
        "label_y": _num(base + 16),
        "bars": bars,
        "marks": marks,
        "ticks": ticks,
        "zero_x": _num(x_of(0.0)) if lo < 0 < hi else None,
        "cmax": cmax,
    }


def _sequence_view(seq: SequenceResult, part: str, qi: int, show_note: bool) -> dict:
    scores = [float(s) for s in seq["token_scores"]]
    return {
        "anchor": f"q{qi}-{part}-{seq['rank']}",
        "rank": seq["rank"],
        "index": seq["index"],
        "score": _fmt(seq["score"]),
        "score_exact": repr(float(seq["score"])),
        "sign": "pos" if seq["score"] > 0 else "neg" if seq["score"] < 0 else "zero",
        "token_sum": _fmt(sum(scores)),
        "n_tokens": len(scores),
        "documents": seq["documents"],
        "spurious": seq["spurious"],
        "concentration": f"{_concentration(scores):.2f}",
        "tokens": _heat_tokens(seq["tokens"], scores),
        "layers": _layer_chart([float(v) for v in seq["layer_scores"]])
        if seq["layer_scores"]
        else None,
        "layer_rows": [_fmt(float(v)) for v in seq["layer_scores"]],
        "note": seq["token_offset_note"] if show_note else None,
    }


def _top_share(query: Any) -> float | None:
    """Share of positive influence held by the top 1% (optional ``sparsity`` field)."""
    sparsity = query.get("sparsity") if isinstance(query, dict) else None
    shares = sparsity.get("top_share") if isinstance(sparsity, dict) else None
    value = shares.get("0.01") if isinstance(shares, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _alpha(query: Any) -> float | None:
    """Power-law exponent of the score tail, if the trace fitted one."""
    sparsity = query.get("sparsity") if isinstance(query, dict) else None
    fit = sparsity.get("power_law") if isinstance(sparsity, dict) else None
    value = fit.get("alpha") if isinstance(fit, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def _query_view(query: QueryResult, qi: int) -> dict:
    seqs = list(query["top"]) + list(query["bottom"])
    notes = {s["token_offset_note"] for s in seqs}
    shared_note = notes.pop() if len(notes) == 1 else None
    hist = query["score_histogram"]
    return {
        "anchor": f"q{qi}",
        "id": query["id"],
        "prompt": query["prompt"],
        "completion": query["completion"],
        "completion_tokens": [_token_segments(t) for t in query["completion_tokens"]],
        "n_scanned": query["n_scanned"],
        "layer_names": query["layer_names"],
        "note": shared_note,
        "hist": _histogram_chart(
            [float(e) for e in hist["edges"]],
            list(hist["counts"]),
            [float(s["score"]) for s in query["top"]],
            [float(s["score"]) for s in query["bottom"]],
        ),
        "hist_total": sum(int(c) for c in hist["counts"]),
        "top_share": _top_share(query),
        "alpha": _alpha(query),
        "n_spurious": sum(bool(s["spurious"]) for s in seqs),
        "top": [_sequence_view(s, "top", qi, shared_note is None) for s in query["top"]],
        "bottom": [_sequence_view(s, "bottom", qi, shared_note is None) for s in query["bottom"]],
    }


# Expand/collapse-all buttons; the page is fully readable without it. Allowed by its
# SHA-256 in the Content-Security-Policy, so no other (injected) script could run.
_SCRIPT = (
    "document.querySelectorAll('[data-toggle]').forEach(function(b){"
    "b.hidden=false;b.addEventListener('click',function(){"
    "var open=b.getAttribute('data-toggle')==='open';"
    "document.querySelectorAll('details.fold').forEach(function(d){d.open=open;});});});"
)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(_TEMPLATE_DIR)),
        autoescape=select_autoescape(enabled_extensions=("html",), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["tojson_text"] = lambda v: json.dumps(v, ensure_ascii=False, sort_keys=True)
    return env


def _render(results: Results) -> str:
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    context = {
        "model": results["model"],
        "corpus": results["corpus"],
        "created": results["created"],
        "config": results["config"],
        "warnings": results["warnings"],
        "queries": [_query_view(q, i) for i, q in enumerate(results["queries"])],
        "format_version": results["format_version"],
        "spurious_ratio": f"{SPURIOUS_RATIO:.3f}",
        # Our own constant, not user-derived text: safe to emit verbatim.
        "script": Markup(_SCRIPT),
        "script_hash": f"sha256-{digest}",
    }
    return _environment().get_template(_TEMPLATE_NAME).render(**context)


def render_report(results: Results | dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Validate ``results`` and write the self-contained HTML report to ``path`` (atomically).

    Returns the path written. Parent directories are created as needed.
    """
    doc = validate_results(results)
    out = Path(path)
    if out.is_dir():
        raise DatasleuthError(
            f"report path {out} is a directory; pass a file name like {out / 'report.html'}"
        )
    html = _render(doc)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, html)
    except OSError as exc:
        raise DatasleuthError(
            f"cannot write report {out} ({exc}); choose a writable path"
        ) from None
    return out
