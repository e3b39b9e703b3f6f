"""Self-contained HTML report of influence results (docs/method.md §6).

The ``trace`` command writes a *results document* (``results.json``);
:mod:`.schema` defines and validates it (:func:`load_results`, :func:`validate_results`)
and :mod:`.render` renders it into one offline HTML file (:func:`render_report`).
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
