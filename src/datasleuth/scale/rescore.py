"""The last step of query batching: re-score the candidates at full rank (docs/method.md §4).

The low-rank scan (:mod:`datasleuth.scale.batching`) finds each query's best
candidates; :func:`top_candidates` gathers them, :func:`subset_loader` streams just
those training examples and :func:`rescore` gives them exact full-rank scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from datasleuth.errors import DatasleuthError
from datasleuth.scoring import FullRankScorer, Scores, collect_scores
from datasleuth.task import Task

__all__ = ["rescore", "subset_loader", "top_candidates"]


def top_candidates(scores: Tensor, n: int) -> Tensor:
    """Sorted union over queries of each query's ``n`` highest-scoring indices: (≤ Q n,).

    ``scores`` is (Q, N) or (N,). These are the candidates to :func:`rescore`.
    """
    s = scores if scores.dim() == 2 else scores[None]
    if n < 1:
        raise DatasleuthError(f"n must be >= 1, got {n}; ask for at least one candidate")
    n = min(n, s.shape[1])
    order = torch.argsort(-s, dim=1, stable=True)[:, :n]  # (Q, n), ties to the lower index
    return torch.unique(order)


def subset_loader(
    dataset: Dataset | Sequence[Any],
    indices: Sequence[int] | Tensor,
    collate: Callable[[list[Any]], Any] | None = None,
    batch_size: int = 8,
) -> DataLoader:
    """A loader over ``dataset[i]`` for ``i`` in ``indices``, in that order (no shuffling)."""
    idx = [int(i) for i in indices]
    if not idx:
        raise DatasleuthError("no indices to load; pass at least one candidate index")
    return DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False,  # type: ignore[arg-type]
                      collate_fn=collate)


def rescore(
    model: nn.Module,
    task: Task,
    preconditioned_full: Mapping[str, Tensor],
    train_subset_loader: Iterable[Any],
    progress: bool = False,
) -> Scores:
    """Full-rank scores of the selected candidates: total (Q, n), per layer (Q, n, L).

    The last step of query batching (docs/method.md §4): the candidates found with low-rank
    queries (:func:`top_candidates`) are scored again with the full-rank Ṽ
    ({name: (Q, P, M+1)}, e.g. from :func:`datasleuth.scoring.precondition_queries`,
    for a chunk of queries at a time if memory is short). Columns follow the order of
    ``train_subset_loader`` (e.g. :func:`subset_loader`).
    """
    scorers = {name: FullRankScorer(v) for name, v in preconditioned_full.items()}
    return collect_scores(model, task, train_subset_loader, scorers, progress, "re-scoring")
