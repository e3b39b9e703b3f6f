"""``trace --refine``: the fitted curvature refined on the corpus (docs/method.md §9).

:func:`refine_on_corpus` wraps the fitted EK-FAC in a
:class:`~datasleuth.refine.RefinedInfluence` whose Gauss-Newton-vector products run on
the sequences the curvature was fitted on (every process uses all of them, so each
refines the same way); the trace then scores with it unchanged.
:func:`annotate_refinement` puts the relative residual of every query into the results
before they are written (``queries[i].refine_residual`` and a ``refine`` summary).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from datasleuth.curvature import Curvature
from datasleuth.lm.corpus import PackedCorpus
from datasleuth.lm.task import CausalLMTask
from datasleuth.refine import RefineConfig, RefinedInfluence

__all__ = ["CorpusBatches", "annotate_refinement", "refine_on_corpus"]


class CorpusBatches(Sequence):
    """The first ``limit`` packed sequences in batches of ``batch_size``, by index."""

    def __init__(self, corpus: PackedCorpus, batch_size: int, limit: int | None = None):
        self.corpus, self.batch_size = corpus, batch_size
        self.n = len(corpus) if limit is None else min(limit, len(corpus))

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.batch_size
        return self.corpus.collate(list(range(start, min(start + self.batch_size, self.n))))


def refine_on_corpus(model: nn.Module, corpus: PackedCorpus, curvature: Curvature,
                     config: RefineConfig, batch_size: int = 8, limit: int | None = None
                     ) -> RefinedInfluence:
    """``curvature`` refined with GGN-vector products on the corpus's first ``limit``."""
    batches = CorpusBatches(corpus, batch_size, limit)
    return RefinedInfluence(model, CausalLMTask(), curvature, batches, config)


def annotate_refinement(results: dict[str, Any], preconditioner: Any) -> None:
    """Add the residuals of a refinement that ran in this call to ``results`` (before they
    are written); nothing for other preconditioners or reused results."""
    if not isinstance(preconditioner, RefinedInfluence) or not preconditioner.info.residual:
        return
    info = preconditioner.info
    results["refine"] = info.summary()
    for query, start, end in zip(results["queries"], info.start, info.residual):
        query["refine_residual"], query["ekfac_residual"] = end, start
