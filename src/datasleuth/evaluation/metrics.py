"""Model-agnostic agreement and detection metrics (docs/method.md §8).

* Correlations between two score vectors (an estimator against a reference such as
  the PBRF or leave-one-out retraining, docs/method.md §8, Bae et al. 2022): Pearson and
  Spearman, safe on constant or non-finite input (they return ``nan`` silently).
* Top-k agreement: overlap of two top-k sets, recall of an exact top-k list.
* Retrieval of known relevant examples (fact tracing, docs/method.md §10): recall@k and the
  mean reciprocal rank of the training examples known to teach each query.
* Mislabel / corruption detection (Koh & Liang 2017, §5.4): rank training examples by
  a score (self-influence, or a baseline such as the training loss), inspect the top
  x% and count how many corrupted examples were found; plus the ROC AUC.

Higher scores always mean "more suspicious" / "ranked first".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from datasleuth.errors import DatasleuthError

__all__ = [
    "pearson",
    "spearman",
    "correlations",
    "top_k_overlap",
    "recall_at_k",
    "relevant_ranks",
    "retrieval_scores",
    "detection_curve",
    "detection_auc",
    "compare_detectors",
    "DEFAULT_FRACTIONS",
]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5)


def _pair(x: object, y: object, name: str = "x and y") -> tuple[np.ndarray, np.ndarray]:
    """Flatten two inputs to float64 vectors of equal length."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise DatasleuthError(
            f"{name} must have the same number of elements (got {a.size} and {b.size}); "
            "pass scores for the same examples in the same order"
        )
    return a, b


def _degenerate(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a correlation is undefined: < 2 points, non-finite or constant input."""
    if a.size < 2 or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return True
    return bool(np.ptp(a) == 0.0 or np.ptp(b) == 0.0)


def pearson(x: object, y: object) -> float:
    """Pearson correlation of two equally long vectors (docs/method.md §8).

    Returns ``nan`` (without warnings) for fewer than two points, a constant input or
    any non-finite value.
    """
    a, b = _pair(x, y)
    if _degenerate(a, b):
        return math.nan
    return float(stats.pearsonr(a, b)[0])


def spearman(x: object, y: object) -> float:
    """Spearman rank correlation (ties get average ranks), as used by the LDS (§8).

    Returns ``nan`` (without warnings) for fewer than two points, a constant input or
    any non-finite value.
    """
    a, b = _pair(x, y)
    if _degenerate(a, b):
        return math.nan
    return float(stats.spearmanr(a, b)[0])


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite entries; ``nan`` (no warning) when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else math.nan


def _rows(scores: object, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 1:
        return arr[None, :]
    if arr.ndim != 2:
        raise DatasleuthError(
            f"{name} must be 1-D (N,) or 2-D (queries, N), got shape {arr.shape}; "
            "reshape the scores"
        )
    return arr


def correlations(scores_a: object, scores_b: object) -> dict[str, object]:
    """Per-query Pearson and Spearman between two score matrices (docs/method.md §8).

    ``scores_a`` and ``scores_b`` are (Q, N) (or (N,), treated as Q = 1). Returns
    ``{"pearson": [Q floats], "spearman": [Q floats], "mean_pearson": float,
    "mean_spearman": float, "n_queries": Q, "n_train": N}``; the means skip ``nan``
    rows (constant scores), and are ``nan`` when every row is undefined.
    """
    a = _rows(scores_a, "scores_a")
    b = _rows(scores_b, "scores_b")
    if a.shape != b.shape:
        raise DatasleuthError(
            f"scores_a has shape {a.shape} but scores_b has shape {b.shape}; "
            "score the same queries against the same training examples"
        )
    p = [pearson(ra, rb) for ra, rb in zip(a, b, strict=True)]
    s = [spearman(ra, rb) for ra, rb in zip(a, b, strict=True)]
    return {
        "pearson": p,
        "spearman": s,
        "mean_pearson": _nanmean(p),
        "mean_spearman": _nanmean(s),
        "n_queries": int(a.shape[0]),
        "n_train": int(a.shape[1]),
    }


def _check_k(k: int, n: int) -> int:
    k = int(k)
    if k < 1 or k > n:
        raise DatasleuthError(f"k must be between 1 and {n}, got {k}; choose a smaller k")
    return k


def _top_k(row: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries; ties broken by the lower index."""
    return np.argsort(-row, kind="stable")[:k]


def top_k_overlap(a: object, b: object, k: int) -> float:
    """Fraction of the top-k examples by score ``a`` that are also top-k by ``b``.

    ``a`` and ``b`` are scores over the same N examples, (N,) or (Q, N); for 2-D
    input the per-query overlaps are averaged. 1.0 means identical top-k sets.
    """
    ra = _rows(a, "a")
    rb = _rows(b, "b")
    if ra.shape != rb.shape:
        raise DatasleuthError(
            f"a has shape {ra.shape} but b has shape {rb.shape}; pass scores for the "
            "same queries and examples"
        )
    k = _check_k(k, ra.shape[1])
    overlaps = [
        np.intersect1d(_top_k(x, k), _top_k(y, k)).size / k for x, y in zip(ra, rb, strict=True)
    ]
    return float(np.mean(overlaps))


def recall_at_k(
    approx_indices: object,
    exact_indices: object,
    k: int,
    *,
    approx_k: int | None = None,
) -> float:
    """Share of the exact top-k examples that an approximate ranking retrieved.

    ``approx_indices`` and ``exact_indices`` are ranked example indices (best first),
    1-D or (Q, ·) rows (averaged over rows). The retrieved set is the first
    ``approx_k`` approximate indices (default ``k``, i.e. classic recall@k; pass
    ``approx_k=len(candidates)`` to ask how much of the true top-k a candidate filter
    such as docs/method.md §5 kept).
    """
    ap = np.asarray(approx_indices)
    ex = np.asarray(exact_indices)
    if ap.ndim == 1:
        ap = ap[None, :]
    if ex.ndim == 1:
        ex = ex[None, :]
    if ap.ndim != 2 or ex.ndim != 2 or ap.shape[0] != ex.shape[0]:
        raise DatasleuthError(
            f"approx_indices {ap.shape} and exact_indices {ex.shape} must be 1-D or "
            "(queries, ·) with the same number of queries; pass one ranking per query"
        )
    k = _check_k(k, ex.shape[1])
    m = k if approx_k is None else int(approx_k)
    if m < 1 or m > ap.shape[1]:
        raise DatasleuthError(
            f"approx_k must be between 1 and {ap.shape[1]}, got {m}; choose a smaller value"
        )
    recalls = [np.isin(e[:k], a[:m]).mean() for a, e in zip(ap, ex, strict=True)]
    return float(np.mean(recalls))


def relevant_ranks(scores: object, relevant: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Per query, the 1-based ranks of its relevant examples (sorted) when examples are
    ordered by descending score, ties broken by the lower index.

    ``scores`` is (Q, N) (or (N,) for one query); ``relevant[q]`` lists example indices.
    """
    rows = _rows(scores, "scores")
    if len(relevant) != rows.shape[0]:
        raise DatasleuthError(
            f"relevant has {len(relevant)} entries for {rows.shape[0]} queries; give one list "
            "of relevant examples per query"
        )
    out = []
    for row, rel in zip(rows, relevant, strict=True):
        idx = np.asarray(list(rel), dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= row.size:
            raise DatasleuthError(
                f"every query needs relevant examples among 0..{row.size - 1}, got "
                f"{idx.tolist()}; check the indices"
            )
        position = np.empty(row.size, dtype=np.int64)
        position[np.argsort(-row, kind="stable")] = np.arange(1, row.size + 1)
        out.append(np.sort(position[np.unique(idx)]))
    return out


def retrieval_scores(
    scores: object, relevant: Sequence[Sequence[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, object]:
    """Recall@k and reciprocal rank of the relevant examples of each query (docs/method.md §10).

    recall@k = |top-k ∩ relevant| / |relevant|; reciprocal rank = 1 / rank of the best
    ranked relevant example (its mean over queries is the MRR). Ties are broken by the
    lower index. Returns ``{"recall": {k: [Q]}, "reciprocal_rank": [Q], "mean_recall":
    {k: float}, "mrr": float, "ranks": [[int]]}``.
    """
    ranks = relevant_ranks(scores, relevant)
    recall = {int(k): [float((r <= k).sum() / r.size) for r in ranks] for k in ks}
    rr = [float(1.0 / r[0]) for r in ranks]
    return {"recall": recall, "reciprocal_rank": rr,
            "mean_recall": {k: float(np.mean(v)) for k, v in recall.items()},
            "mrr": float(np.mean(rr)), "ranks": [r.tolist() for r in ranks]}


def _detection_inputs(score: object, is_corrupt: object) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    c = np.asarray(is_corrupt).reshape(-1)
    if s.shape != c.shape:
        raise DatasleuthError(
            f"score has {s.size} entries but is_corrupt has {c.size}; pass one flag per "
            "training example"
        )
    if not np.all(np.isin(c, (0, 1, False, True))):
        raise DatasleuthError(
            "is_corrupt must be boolean (or 0/1); pass a mask of corrupted examples"
        )
    if not np.all(np.isfinite(s)):
        raise DatasleuthError("score contains NaN or inf; fix or drop those examples first")
    c = c.astype(bool)
    if not c.any():
        raise DatasleuthError("is_corrupt marks no example as corrupt; mark at least one")
    return s, c


def detection_curve(
    self_influence: object,
    is_corrupt: object,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, object]:
    """Fraction of corrupt examples found after inspecting the top x% by a score.

    Koh & Liang 2017 (§5.4): sort the training set by self-influence (or any
    suspicion score, higher first), inspect the first ``ceil(x * N)`` examples and
    report the share of all corrupted examples among them. Ties are broken by the
    lower index. Returns ``{"fractions", "n_inspected", "found", "random", "n",
    "n_corrupt"}`` where ``random`` is the expected share for a random order (= the
    inspected fraction).
    """
    s, c = _detection_inputs(self_influence, is_corrupt)
    n = s.size
    fr = [float(f) for f in fractions]
    if any(not 0.0 < f <= 1.0 for f in fr):
        raise DatasleuthError(f"fractions must lie in (0, 1], got {fr}; pass e.g. (0.01, 0.1)")
    order = np.argsort(-s, kind="stable")
    found_cum = np.cumsum(c[order])
    n_corrupt = int(c.sum())
    inspected = [min(n, max(1, math.ceil(f * n - 1e-9))) for f in fr]
    found = [float(found_cum[m - 1] / n_corrupt) for m in inspected]
    return {
        "fractions": fr,
        "n_inspected": inspected,
        "found": found,
        "random": [m / n for m in inspected],
        "n": n,
        "n_corrupt": n_corrupt,
    }


def detection_auc(score: object, is_corrupt: object) -> float:
    """ROC AUC of ``score`` as a detector of corrupted examples (sklearn's roc_auc_score).

    1.0: every corrupted example outscores every clean one; 0.5: chance.
    """
    s, c = _detection_inputs(score, is_corrupt)
    if c.all():
        raise DatasleuthError("is_corrupt marks every example as corrupt; include clean examples")
    return float(roc_auc_score(c, s))


def compare_detectors(
    scores: Mapping[str, object],
    is_corrupt: object,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, object]:
    """Detection curve and AUC for several scores side by side (Koh & Liang 2017 §5.4).

    ``scores`` maps a name (e.g. ``"self_influence"``, ``"train_loss"``) to one score
    per training example. Returns ``{"n", "n_corrupt", "fractions", "random",
    "detectors": {name: {"auc", "found", "n_inspected"}}}`` (JSON-serialisable).
    """
    if not scores:
        raise DatasleuthError(
            "scores is empty; pass at least one named score, e.g. {'loss': losses}"
        )
    detectors: dict[str, dict[str, object]] = {}
    curve: dict[str, object] = {}
    for name, score in scores.items():
        curve = detection_curve(score, is_corrupt, fractions)
        detectors[str(name)] = {
            "auc": detection_auc(score, is_corrupt),
            "found": curve["found"],
            "n_inspected": curve["n_inspected"],
        }
    return {
        "n": curve["n"],
        "n_corrupt": curve["n_corrupt"],
        "fractions": curve["fractions"],
        "random": curve["random"],
        "detectors": detectors,
    }
