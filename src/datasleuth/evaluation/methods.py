"""The baselines of the evaluation suite, beside the influence estimators (METHOD.md §7, §10).

An influence estimator of the suite is a preconditioner scored by ``pairwise_scores``
(:data:`datasleuth.evaluation.suite.ESTIMATORS`; the gradient dot product is its
``identity`` estimator). A baseline here is a function of the problem that returns
the (Q, N) scores directly (:mod:`datasleuth.baselines`):

* ``cosine``: unit-normalised gradients over the tracked layers (TrackStar);
* ``repsim``: cosine of representations: the mean over real positions of the input of
  the model's output embedding (``get_output_embeddings()``, a language model's last
  hidden state) or, for models without one, of the last tracked layer;
* ``bm25``: BM25 over token ids (METHOD.md §5) of the query's whole text against each
  training sequence; needs batches with ``input_ids`` (language-model recipes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from datasleuth.baselines import (
    bm25_scores,
    gradient_cosine_scores,
    module_input_representation,
    representation_scores,
)
from datasleuth.errors import DatasleuthError
from datasleuth.evaluation.recipes import Problem
from datasleuth.layers import TrackedLayer

__all__ = ["BASELINES", "BaselineSpec", "representation_module", "token_rows"]


@dataclass(frozen=True)
class BaselineSpec:
    """One baseline of the suite: ``score(problem, layers) -> (Q, N)`` scores."""

    name: str
    description: str
    score: Callable[[Problem, list[TrackedLayer]], np.ndarray]

    def run(self, problem: Problem, layers: list[TrackedLayer]
            ) -> tuple[np.ndarray, dict[str, Any]]:
        """The (Q, N) scores and the suite's result entry (description, seconds)."""
        start = time.perf_counter()
        scores = self.score(problem, layers)
        seconds = time.perf_counter() - start
        return scores, {"description": self.description, "damping": None,
                        "seconds": {"fit": 0.0, "score": seconds, "total": seconds}}


def representation_module(model: nn.Module, layers: list[TrackedLayer]) -> nn.Module:
    """The module whose input is the representation (module docstring)."""
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    return module if isinstance(module, nn.Module) else layers[-1].module


def token_rows(loader: Iterable[Any]) -> list[np.ndarray]:
    """Each example's real token ids (``attention_mask`` 1) from CONTRACT batches."""
    rows: list[np.ndarray] = []
    for batch in loader:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise DatasleuthError("bm25 ranks token ids, but this recipe's batches hold no "
                                  "'input_ids'; use bm25 on language-model recipes")
        ids = batch["input_ids"].cpu().numpy()
        mask = batch.get("attention_mask")
        keep = mask.cpu().numpy().astype(bool) if mask is not None else np.ones_like(ids, bool)
        rows += [row[k] for row, k in zip(ids, keep)]
    return rows


def _cosine(problem: Problem, layers: list[TrackedLayer]) -> np.ndarray:
    return gradient_cosine_scores(problem.model, problem.task, problem.loader("queries"),
                                  problem.loader("train"), layers, progress=False
                                  ).total.double().numpy()


def _repsim(problem: Problem, layers: list[TrackedLayer]) -> np.ndarray:
    represent = module_input_representation(problem.task,
                                            representation_module(problem.model, layers))
    return representation_scores(problem.model, represent, problem.loader("queries"),
                                 problem.loader("train"), progress=False).total.numpy()


def _bm25(problem: Problem, layers: list[TrackedLayer]) -> np.ndarray:
    queries = token_rows(problem.loader("queries"))
    return bm25_scores(queries, token_rows(problem.loader("train"))).total.numpy()


BASELINES: dict[str, BaselineSpec] = {
    spec.name: spec
    for spec in (
        BaselineSpec("cosine", "unit-normalised gradients (TrackStar, Chang et al. 2024)",
                     _cosine),
        BaselineSpec("repsim", "representation similarity: cosine of mean last hidden "
                     "states (Li et al. 2024)", _repsim),
        BaselineSpec("bm25", "BM25 over token ids (Grosse et al. 2023's filter as a "
                     "ranking)", _bm25),
    )
}
