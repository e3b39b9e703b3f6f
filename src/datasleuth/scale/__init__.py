"""Scaling influence to large corpora (docs/method.md §4, §5, §7).

* :mod:`~datasleuth.scale.batching` -- query batching with rank-k query gradients;
* :mod:`~datasleuth.scale.bm25` -- the BM25 candidate filter of Grosse et al. 2023;
* :mod:`~datasleuth.scale.index` -- a projected-gradient index (LoGra-style).
"""

from __future__ import annotations

from datasleuth.scale.batching import (
    LowRankQueries,
    LowRankScorer,
    compress_queries,
    low_rank_scores,
    rescore,
    scan_low_rank,
    top_candidates,
)
from datasleuth.scale.bm25 import CandidateFilter
from datasleuth.scale.index import (
    GradientIndex,
    IndexConfig,
    LayerProjection,
    ProjectedCurvature,
    ProjectedScorer,
    build_index,
    fit_projected_curvature,
)

__all__ = [
    "CandidateFilter",
    "GradientIndex",
    "IndexConfig",
    "LayerProjection",
    "LowRankQueries",
    "LowRankScorer",
    "ProjectedCurvature",
    "ProjectedScorer",
    "build_index",
    "compress_queries",
    "fit_projected_curvature",
    "low_rank_scores",
    "rescore",
    "scan_low_rank",
    "top_candidates",
]
