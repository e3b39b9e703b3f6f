"""Render a results document into ONE self-contained HTML file (docs/method.md §6).

Inline CSS, inline SVG charts built from numbers only, one small inline script
(allowed by hash in the page's Content-Security-Policy), no external resources.
Every piece of user-derived text (training tokens, prompt, completion, model name,
warnings, config) goes through Jinja2 autoescaping; the template never marks such
text ``|safe``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from datasleuth.errors import DatasleuthError
from datasleuth.report.schema import QueryResult, Results, SequenceResult, validate_results
from datasleuth.storage import write_text

__all__ = ["SPURIOUS_RATIO", "render_report"]

SPURIOUS_RATIO = 2.0 / 3.0  # docs/method.md §6: ||a||_2 / ||a||_1 above this flags one token

_TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates"
_TEMPLATE_NAME = "report.html"


# --------------------------------------------------------------------------- view model

# Visible stand-ins for whitespace and control characters inside tokens.
_WS_SYMBOLS = {"\t": "⇥", "\r": "␍", "\v": "␋", "\f": "␌"}
_CONTROL = re.compile(r"([\x00-\x1f\x7f])")


def _fmt(x: float) -> str:
    """The report's one format for scores: signed, 4 significant digits, exponent always
    shown (``+1.234e+03``), so every score on the page reads the same way."""
    return f"{float(x):+.3e}"


def _fmt_logp(x: float) -> str:
    """A log-probability or its change (tail-patch), which is not a score: ``+0.25``."""
    return f"{float(x):+.4g}"


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
    """``||a||_2 / ||a||_1`` of token scores (docs/method.md §6); 0 for an all-zero vector."""
    l1 = sum(abs(s) for s in scores)
    return math.sqrt(sum(s * s for s in scores)) / l1 if l1 > 0 else 0.0


def _short_layer_names(names: list[str]) -> list[str]:
    """Layer names without the prefix they all share up to a dot (``transformer.h.``)."""
    if len(names) < 2:
        return [n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] if n.count(".") >= 2 else n
                for n in names]
    prefix = os.path.commonprefix(names)
    cut = prefix.rfind(".") + 1
    return [n[cut:] or n for n in names]


def _layer_chart(values: list[float], names: list[str], width: float = 300.0) -> dict:
    """Horizontal signed bars, one row per layer labelled with its name, from a zero line,
    over an axis ticked at -max, 0 and +max (docs/method.md §6: the score is their sum)."""
    row = 15.0 if len(values) <= 16 else 10.0
    label_w, right = 100.0, 6.0
    x0, x1 = label_w, width - right
    mid = (x0 + x1) / 2
    half = (x1 - x0) / 2
    peak = max((abs(v) for v in values), default=0.0)
    labels = _short_layer_names(names) if len(names) == len(values) else \
        [str(i) for i in range(len(values))]
    rows = []
    for i, v in enumerate(values):
        w = abs(v) / peak * half if peak > 0 else 0.0
        full = names[i] if len(names) == len(values) else f"layer {i}"
        rows.append({
            "x": _num(mid if v >= 0 else mid - w), "y": _num(i * row + 2), "w": _num(w),
            "h": _num(row - 4), "ty": _num(i * row + row - 4), "cls": "pos" if v > 0 else "neg",
            "label": labels[i][-18:], "title": f"{full}: {_fmt(v)}",
        })
    axis_y = len(values) * row + 2
    return {
        "width": _num(width), "height": _num(axis_y + 16), "mid": _num(mid),
        "x0": _num(x0), "x1": _num(x1), "label_x": _num(x0 - 4), "axis_y": _num(axis_y),
        "tick_y": _num(axis_y + 12), "rows": rows, "peak": _fmt(peak).lstrip("+"),
        "ticks": [(_num(x0), "start", _fmt(-peak)), (_num(mid), "middle", "0"),
                  (_num(x1), "end", _fmt(peak))],
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


_DOC_NAME_FIELDS = ("title", "source", "url", "id", "doc_id")
"""Corpus columns that name a document, most telling first."""


def _document_views(docs: list[Any], marks: dict[int, str]) -> list[dict]:
    """Each document piece of a sequence: its name (the corpus's title/source/id column
    where it has one), character span and mark (e.g. ``PLANTED`` in the demo)."""
    views = []
    for d in docs:
        named = [(k, d[k]) for k in _DOC_NAME_FIELDS if d.get(k) not in (None, "")]
        views.append({
            "doc_index": d["doc_index"], "char_start": d["char_start"],
            "char_end": d["char_end"], "mark": marks.get(int(d["doc_index"]), ""),
            "name": str(named[0][1]) if named else None,
            "name_field": named[0][0] if named else None,
        })
    return views


def _sequence_view(seq: SequenceResult, part: str, qi: int, show_note: bool,
                   layer_names: list[str], marks: dict[int, str]) -> dict:
    scores = [float(s) for s in seq["token_scores"]]
    documents = _document_views(list(seq["documents"]), marks)
    return {
        "anchor": f"q{qi}-{part}-{seq['rank']}",
        "rank": seq["rank"],
        "index": seq["index"],
        "score": _fmt(seq["score"]),
        "score_exact": repr(float(seq["score"])),
        "sign": "pos" if seq["score"] > 0 else "neg" if seq["score"] < 0 else "zero",
        "token_sum": _fmt(sum(scores)),
        "n_tokens": len(scores),
        "documents": documents,
        "marks": sorted({d["mark"] for d in documents if d["mark"]}),
        "spurious": seq["spurious"],
        "concentration": f"{_concentration(scores):.2f}",
        "tokens": _heat_tokens(seq["tokens"], scores),
        "layers": _layer_chart([float(v) for v in seq["layer_scores"]], layer_names)
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


def _residuals(query: Any) -> tuple[float, float] | None:
    """(EK-FAC's, the refined) relative residual of a ``trace --refine`` query (§9)."""
    start, end = query.get("ekfac_residual"), query.get("refine_residual")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)):
        return float(start), float(end)
    return None


def _tail_patch_view(patch: Any) -> dict | None:
    """The compact tail-patch table of a query (optional field), best gain marked."""
    if not isinstance(patch, dict):
        return None
    gains = [r["gain"] for r in patch["rows"] if r.get("gain") is not None]
    best = max(gains, default=None)
    rows = [{"method": r["method"],
             "gain": "—" if r.get("gain") is None else _fmt_logp(r["gain"]),
             "std": None if r.get("std") is None else f"{r['std']:.3g}",
             "draws": r.get("draws"),
             "cls": "pos" if (r.get("gain") or 0) > 0 else "neg" if (r.get("gain") or 0) < 0
             else "zero",
             "best": r.get("gain") is not None and r["gain"] == best}
            for r in patch["rows"]]
    return {"k": patch["k"], "steps": patch.get("steps", 1), "lr": patch.get("lr"),
            "optimizer": patch.get("optimizer", ""), "before": _fmt_logp(patch["before"]),
            "rows": rows}


def _query_view(query: QueryResult, qi: int, marks: dict[int, str]) -> dict:
    seqs = list(query["top"]) + list(query["bottom"])
    notes = {s["token_offset_note"] for s in seqs}
    shared_note = notes.pop() if len(notes) == 1 else None
    hist = query["score_histogram"]
    names = list(query["layer_names"])
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
        "refine": _residuals(query),
        "n_spurious": sum(bool(s["spurious"]) for s in seqs),
        "tail_patch": _tail_patch_view(query.get("tail_patch")),
        "top": [_sequence_view(s, "top", qi, shared_note is None, names, marks)
                for s in query["top"]],
        "bottom": [_sequence_view(s, "bottom", qi, shared_note is None, names, marks)
                   for s in query["bottom"]],
    }


def _method_name(config: Any) -> str:
    """The trace's method: a baseline's name, or the influence curvature kind."""
    if not isinstance(config, dict):
        return "influence"
    if isinstance(config.get("method"), str):
        return config["method"]
    curvature = config.get("curvature")
    kind = curvature.get("curvature") if isinstance(curvature, dict) else None
    return str(kind) if kind else "influence"


def _comparison_view(comparison: dict[str, Any] | None) -> dict | None:
    """The demo's side-by-side table: per method, the ranks of the planted documents among
    its top and bottom ``k``."""
    if not comparison:
        return None
    rows = [{"method": str(m["method"]), "n_top": len(m["top"]), "n_bottom": len(m["bottom"]),
             "top": ", ".join(f"#{r}" for r in m["top"]) or "—",
             "bottom": ", ".join(f"#{r}" for r in m["bottom"]) or "—"}
            for m in comparison["methods"]]
    best = max((r["n_top"] for r in rows), default=0)
    for r in rows:
        r["best"] = best > 0 and r["n_top"] == best
    return {"planted": int(comparison["planted"]), "k": int(comparison["k"]), "rows": rows}


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


def _render(results: Results, marks: dict[int, str], comparison: dict[str, Any] | None
            ) -> str:
    digest = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    context = {
        "model": results["model"],
        "corpus": results["corpus"],
        "created": results["created"],
        "config": results["config"],
        "warnings": results["warnings"],
        "queries": [_query_view(q, i, marks) for i, q in enumerate(results["queries"])],
        "method": _method_name(results["config"]),
        "comparison": _comparison_view(comparison),
        "format_version": results["format_version"],
        "spurious_ratio": f"{SPURIOUS_RATIO:.3f}",
        # Our own constant, not user-derived text: safe to emit verbatim.
        "script": Markup(_SCRIPT),
        "script_hash": f"sha256-{digest}",
    }
    return _environment().get_template(_TEMPLATE_NAME).render(**context)


def render_report(results: Results | dict[str, Any], path: str | os.PathLike[str], *,
                  marks: dict[int, str] | None = None,
                  comparison: dict[str, Any] | None = None) -> Path:
    """Validate ``results`` and write the self-contained HTML report to ``path`` (atomically).

    ``marks`` labels documents by corpus index (the demo: ``PLANTED``, ``decoy``);
    ``comparison`` (the demo) is ``{"planted": n, "k": k, "methods": [{"method", "top",
    "bottom"}]}``, each method's ranks of marked documents, shown as a table. Returns the
    path written. Parent directories are created as needed.
    """
    doc = validate_results(results)
    out = Path(path)
    if out.is_dir():
        raise DatasleuthError(
            f"report path {out} is a directory; pass a file name like {out / 'report.html'}"
        )
    html = _render(doc, marks or {}, comparison)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, html)
    except OSError as exc:
        raise DatasleuthError(
            f"cannot write report {out} ({exc}); choose a writable path"
        ) from None
    return out
