"""Evaluation of influence estimates (docs/method.md §8, §10): correlations, LDS, detection,
sparsity, retrieval of known teaching examples and tail-patch."""

from __future__ import annotations

from datasleuth.evaluation.ground_truth import PBRF, leave_one_out, pbrf_scores
from datasleuth.evaluation.lds import LDSResult, lds, make_subsets, run_lds_experiments, subset_hash
from datasleuth.evaluation.metrics import (
    compare_detectors,
    correlations,
    detection_auc,
    detection_curve,
    pearson,
    recall_at_k,
    relevant_ranks,
    retrieval_scores,
    spearman,
    top_k_overlap,
)
from datasleuth.evaluation.sparsity import PowerLawFit, fit_power_law, sparsity_report, top_share
from datasleuth.evaluation.tail_patch import TailPatchConfig, tail_patch

__all__ = [
    "PBRF",
    "LDSResult",
    "PowerLawFit",
    "TailPatchConfig",
    "compare_detectors",
    "correlations",
    "detection_auc",
    "detection_curve",
    "fit_power_law",
    "lds",
    "leave_one_out",
    "make_subsets",
    "pbrf_scores",
    "pearson",
    "recall_at_k",
    "relevant_ranks",
    "retrieval_scores",
    "run_lds_experiments",
    "sparsity_report",
    "spearman",
    "subset_hash",
    "tail_patch",
    "top_k_overlap",
    "top_share",
]
