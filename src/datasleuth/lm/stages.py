"""The candidate stages of a trace: how each query's candidates are found and scored.

A trace ends in exact (full-rank) scores of each query's top and bottom sequences;
what differs is how the candidates are found (:func:`datasleuth.lm.pipeline.run_trace`
chooses):

* :func:`full_scan` -- every sequence (or each query's BM25 candidates) scored with
  full-rank preconditioned query gradients: no first stage;
* :func:`low_rank_stage` -- query batching (docs/method.md §4): one pass with rank-k query
  gradients keeps each query's best and worst sequences;
* :func:`index_stage` -- a projected-gradient index search (docs/method.md §7);

and then :func:`rescore_by_chunks` scores a first stage's candidates at full rank.
Nothing here prints; the pipeline says what happened.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from datasleuth.curvature import Curvature
from datasleuth.lm.corpus import PackedCorpus
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import TraceConfig, scan_corpus, trace_details
from datasleuth.scoring import precondition_queries

if TYPE_CHECKING:
    from datasleuth.scale.index import GradientIndex

__all__ = [
    "TraceJob",
    "FirstStage",
    "full_scan",
    "low_rank_stage",
    "index_stage",
    "index_candidates",
    "rescore_by_chunks",
]


def index_candidates(
    index: GradientIndex, model: nn.Module, batches: list[dict[str, torch.Tensor]], n: int,
    bottom: bool, approximate: bool, sample: int,
) -> tuple[list[np.ndarray], list[list[float]], list[int]]:
    """Per query, the rows of the ``n`` highest (and lowest) index scores; a score sample."""
    pre = precondition_queries(model, CausalLMTask(), index.curvature, batches,
                               features=index.features)  # {layer: (Q, D_l)}
    q = index.flatten(pre)  # (Q, D), laid out like the rows
    top, _ = index.search(q, k=n, exact=not approximate)
    lists = [top[j].numpy() for j in range(q.shape[0])]
    if bottom:
        low, _ = index.search(-q, k=n, exact=not approximate)
        lists = [np.union1d(a, low[j].numpy()) for j, a in enumerate(lists)]
    stride = max(1, index.rows // sample)
    samples: list[list[float]] = [[] for _ in range(q.shape[0])]
    for ids in torch.arange(0, index.rows, stride).split(index.block_rows(q.dtype)):
        part = q @ index.gather_rows(ids, q.dtype).t()  # (Q, n_sampled): only these decoded
        for j in range(q.shape[0]):
            samples[j].extend(part[j].tolist())
    return lists, samples, [index.rows] * q.shape[0]


@dataclass
class TraceJob:
    """What every candidate stage of one trace needs."""

    model: nn.Module
    corpus: PackedCorpus
    curvature: Curvature
    config: TraceConfig
    batches: list[dict[str, Tensor]]
    rows: list[dict[str, Any]]
    header: dict[str, Any]
    candidates: list[np.ndarray] | None
    scores_dir: Path | None
    checkpoint: Path
    key: str
    progress: bool

    @property
    def query_ids(self) -> list[str]:
        return [row["id"] for row in self.rows]


class FirstStage(NamedTuple):
    """Candidates per query from a cheap first pass, before exact re-scoring."""

    candidates: list[np.ndarray]
    samples: list[list[float]]  # histogram sample of the first-stage scores
    scanned: list[int]
    stage: dict[str, Any]  # results["config"]["first_stage"]
    warning: str


def full_scan(job: TraceJob) -> tuple[dict[str, Any], int]:
    """Every sequence (or BM25 candidate) scored with full-rank preconditioned queries.

    Returns the results document and the number of sequences a resumed scan skipped.
    """
    pre = precondition_queries(job.model, CausalLMTask(), job.curvature, job.batches)
    scan = scan_corpus(job.model, pre, job.corpus, job.config, candidates=job.candidates,
                       scores_dir=job.scores_dir, query_ids=job.query_ids,
                       progress=job.progress, checkpoint=job.checkpoint, run_key=job.key)
    doc = trace_details(job.model, pre, job.corpus, scan, job.rows, job.config, job.header)
    return doc, scan.stats["resumed_at"]


def index_stage(job: TraceJob, index: GradientIndex, directory: str | Path, rescore: int,
                 approximate: bool) -> FirstStage:
    """Candidates from a projected-gradient index search (docs/method.md §7)."""
    lists, samples, scanned = index_candidates(
        index, job.model, job.batches, rescore, job.config.bottom_k > 0, approximate,
        job.config.histogram_sample)
    return FirstStage(
        lists, samples, scanned,
        {"kind": "index", "index": str(directory), "approximate": approximate,
         "rescored_per_query": rescore},
        f"candidates from the projected-gradient index {directory} ({rescore} per query); "
        f"scores re-computed with full {job.curvature.kind}; the histogram shows projected "
        "index scores")


def low_rank_stage(job: TraceJob, rank: int, rescore: int) -> FirstStage:
    """Candidates from one pass with rank-``rank`` query gradients (docs/method.md §4)."""
    from datasleuth.scale.batching import compress_queries, scan_low_rank

    low = compress_queries(job.model, CausalLMTask(), job.curvature, job.batches, rank)
    wide = replace(job.config, top_k=rescore, bottom_k=rescore if job.config.bottom_k else 0)
    scan = scan_corpus(
        job.model, None, job.corpus, wide, candidates=job.candidates,
        scores_dir=job.scores_dir, query_ids=job.query_ids, progress=job.progress,
        checkpoint=job.checkpoint, run_key=job.key,
        shape=(len(job.rows), len(low.layer_names)),
        scanner=lambda m, t, loader, on_scores, p: scan_low_rank(m, t, low, loader, on_scores, p))
    lists = [np.union1d(np.array([i for i, _, _ in scan.top.results(q)], np.int64),
                        np.array([i for i, _, _ in scan.bottom.results(q)], np.int64))
             for q in range(len(job.rows))]
    return FirstStage(
        lists, scan.samples, scan.scanned,
        {"kind": "low_rank", "rank": rank, "rescored_per_query": rescore},
        f"candidates from rank-{rank} query batching ({rescore} best and worst per query), "
        f"re-scored at full rank; the histogram shows rank-{rank} scores")


def rescore_by_chunks(job: TraceJob, first: FirstStage) -> dict[str, Any]:
    """Full-rank EK-FAC scores of each query's candidates, one query batch at a time.

    The last step of query batching (docs/method.md §4): only one batch of full-rank
    preconditioned query gradients is held at once. Histogram and counts come from the
    first stage, which saw every sequence.
    """
    doc: dict[str, Any] | None = None
    first_query = 0
    for batch in job.batches:  # the scan of each batch's candidates shows its own progress
        nq = int(batch["input_ids"].shape[0])
        pre = precondition_queries(job.model, CausalLMTask(), job.curvature, [batch])
        part = slice(first_query, first_query + nq)
        scan = scan_corpus(job.model, pre, job.corpus, job.config,
                           candidates=first.candidates[part], progress=job.progress)
        rescored = list(scan.scanned)
        scan.samples, scan.scanned = first.samples[part], first.scanned[part]
        chunk = trace_details(job.model, pre, job.corpus, scan, job.rows[part], job.config,
                              job.header, rescored=True)
        for query, n in zip(chunk["queries"], rescored, strict=True):
            query["n_rescored"] = int(n)  # sequences given exact scores (n_scanned: stage 1)
        if doc is None:
            doc = chunk
        else:
            doc["queries"].extend(chunk["queries"])
        first_query += nq
    assert doc is not None
    return doc
