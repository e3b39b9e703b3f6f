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

from datasleuth.report.render import SPURIOUS_RATIO, render_report
from datasleuth.report.schema import (
    FORMAT_VERSION,
    Document,
    QueryResult,
    Results,
    ScoreHistogram,
    SequenceResult,
    load_results,
    validate_results,
)

__all__ = [
    "FORMAT_VERSION",
    "SPURIOUS_RATIO",
    "Document",
    "QueryResult",
    "Results",
    "ScoreHistogram",
    "SequenceResult",
    "load_results",
    "render_report",
    "validate_results",
]
