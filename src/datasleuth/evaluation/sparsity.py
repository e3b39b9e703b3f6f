"""How concentrated is influence? Power-law tail fit and top-share (docs/method.md §8).

Grosse et al. 2023 (§5.2.1) find influence heavy-tailed: a few training sequences carry
most of it. We fit a continuous power law p(x) ∝ x^(-alpha), x >= xmin, to the positive
scores with the method of Clauset, Shalizi & Newman 2009 (maximum-likelihood alpha,
xmin chosen to minimise the Kolmogorov-Smirnov distance; via the ``powerlaw``
package), and compare it against lognormal and exponential tails with Vuong's
log-likelihood ratio test (Clauset et al. §5). ``top_share`` is the share of the total
positive influence that the top 1% of training examples hold.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from datasleuth.errors import DatasleuthError

__all__ = ["PowerLawFit", "fit_power_law", "top_share", "sparsity_report", "MIN_TAIL_POINTS"]

#: Fewest positive scores for which a power-law fit is attempted.
MIN_TAIL_POINTS = 10


@dataclass(frozen=True)
class PowerLawFit:
    """Result of a Clauset et al. (2009) power-law fit to the positive scores.

    ``alpha``: exponent of the density x^(-alpha) above ``xmin``; ``ks_distance``: KS
    distance between the tail and the fit; ``n_tail``: scores >= xmin; ``n_positive``:
    positive scores fitted. ``*_R`` is the log-likelihood ratio power law vs the
    alternative (> 0 favours the power law) and ``*_p`` its significance (small p:
    the sign of R is meaningful); ``nan`` where the alternative could not be fitted.
    """

    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int
    n_positive: int
    lognormal_R: float
    lognormal_p: float
    exponential_R: float
    exponential_p: float

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready dict; non-finite numbers become ``None``."""
        return {k: _clean(v) for k, v in asdict(self).items()}


def _clean(value: float | int) -> float | int | None:
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the powerlaw package: its prints, warnings and numpy floating-point noise."""
    sink = io.StringIO()
    with (
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
        warnings.catch_warnings(),
        np.errstate(all="ignore"),
    ):
        warnings.simplefilter("ignore")
        yield


def _vector(scores: object) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise DatasleuthError(
            f"scores must be 1-D (one query's scores over the training set), got {arr.shape}; "
            "pass one row at a time"
        )
    return arr


def fit_power_law(scores: object, xmin: float | None = None) -> PowerLawFit:
    """Fit a power law to the positive scores (Clauset, Shalizi & Newman 2009).

    ``xmin=None`` chooses xmin by minimising the KS distance (Clauset et al. §3.3);
    otherwise the tail starts at the given value. Non-positive and non-finite scores
    are ignored. Needs at least ``MIN_TAIL_POINTS`` positive scores.
    """
    import powerlaw

    arr = _vector(scores)
    pos = arr[np.isfinite(arr) & (arr > 0)]
    if pos.size < MIN_TAIL_POINTS:
        raise DatasleuthError(
            f"only {pos.size} positive scores; a power-law fit needs at least {MIN_TAIL_POINTS}, "
            "score more training examples"
        )
    if xmin is not None and not (math.isfinite(float(xmin)) and float(xmin) > 0):
        raise DatasleuthError(f"xmin must be a positive number, got {xmin}; or leave it None")
    if xmin is not None and int(np.count_nonzero(pos >= float(xmin))) < 2:
        raise DatasleuthError(f"fewer than 2 positive scores are >= xmin={xmin}; lower xmin")
    with _quiet():
        fit = powerlaw.Fit(pos, xmin=None if xmin is None else float(xmin), verbose=0)
        alpha = float(fit.power_law.alpha)
        ks = float(fit.power_law.D)
        comparisons = []
        for alternative in ("lognormal", "exponential"):
            try:
                r, p = fit.distribution_compare("power_law", alternative)
            except (ValueError, FloatingPointError, ZeroDivisionError):
                r, p = math.nan, math.nan
            comparisons.extend([float(r), float(p)])
    return PowerLawFit(
        alpha=alpha,
        xmin=float(fit.xmin),
        ks_distance=ks,
        n_tail=int(fit.n_tail),
        n_positive=int(pos.size),
        lognormal_R=comparisons[0],
        lognormal_p=comparisons[1],
        exponential_R=comparisons[2],
        exponential_p=comparisons[3],
    )


def top_share(scores: object, fraction: float = 0.01) -> float:
    """Share of the total positive influence held by the top ``fraction`` of examples.

    The top ``ceil(fraction * N)`` examples (N = all scored examples) by score; their
    positive scores summed over the sum of all positive scores. ``nan`` if no score is
    positive.
    """
    arr = _vector(scores)
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise DatasleuthError(f"fraction must lie in (0, 1], got {fraction}; use e.g. 0.01")
    if arr.size == 0:
        raise DatasleuthError("scores is empty; score at least one training example")
    if not np.all(np.isfinite(arr)):
        raise DatasleuthError("scores contain NaN or inf; fix or drop those examples first")
    pos = np.clip(arr, 0.0, None)
    total = pos.sum()
    if total <= 0:
        return math.nan
    k = min(arr.size, max(1, math.ceil(fraction * arr.size - 1e-9)))
    top = np.sort(pos)[::-1][:k]
    return float(top.sum() / total)


def sparsity_report(
    scores: object, fractions: Sequence[float] = (0.001, 0.01, 0.1)
) -> dict[str, object]:
    """Heavy-tail summary of influence scores (docs/method.md §8), JSON-serialisable.

    For 1-D scores: counts, ``top_share`` for each fraction (keyed by the fraction as
    a string) and the power-law fit (``None`` plus a ``power_law_note`` when there are
    too few positive scores). For 2-D (Q, N) scores: ``{"per_query": [report, ...]}``.
    """
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 2:
        return {"per_query": [sparsity_report(row, fractions) for row in arr]}
    arr = _vector(arr)
    finite = arr[np.isfinite(arr)]
    report: dict[str, object] = {
        "n": int(arr.size),
        "n_positive": int(np.count_nonzero(finite > 0)),
        "n_negative": int(np.count_nonzero(finite < 0)),
        "top_share": {str(f): _clean(top_share(finite, f)) for f in fractions}
        if finite.size
        else {},
    }
    try:
        report["power_law"] = fit_power_law(finite).to_dict()
    except DatasleuthError as exc:
        report["power_law"] = None
        report["power_law_note"] = str(exc)
    return report
