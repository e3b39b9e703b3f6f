"""The estimators and baselines of the evaluation suite (docs/method.md §7, §9, §10).

Each influence estimator is one entry of :data:`ESTIMATORS`: a name and a function that
builds a :class:`~datasleuth.preconditioner.Preconditioner` from a :class:`_Context`
(the recipe's problem, its layers and damping; the EK-FAC fit shared by the reference
estimators and the refined ones). ``ekfac_shared_labels`` is EK-FAC fitted as before each
pass drew its own labels; ``ekfac_refined`` and ``ekfac_astra`` refine EK-FAC
(:mod:`datasleuth.refine`).

An influence estimator of the suite is a preconditioner scored by ``pairwise_scores``
(:data:`datasleuth.evaluation.suite.ESTIMATORS`; the gradient dot product is its
``identity`` estimator). A baseline here is a function of the problem that returns
the (Q, N) scores directly (:mod:`datasleuth.baselines`):

* ``cosine``: unit-normalised gradients over the tracked layers (TrackStar);
* ``repsim``: cosine of representations: the mean over real positions of the input of
  the model's output embedding (``get_output_embeddings()``, a language model's last
  hidden state) or, for models without one, of the last tracked layer;
* ``bm25``: BM25 over token ids (docs/method.md §5) of the query's whole text against each
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
from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.evaluation.recipes import Problem
from datasleuth.fitting import FitConfig, fit_curvature
from datasleuth.layers import TrackedLayer
from datasleuth.preconditioner import Preconditioner

__all__ = ["BASELINES", "BaselineSpec", "DEFAULT_ESTIMATORS", "ESTIMATORS", "EstimatorSpec",
           "REFINE_STEPS", "representation_module", "token_rows"]


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


REFINE_STEPS = 20  # refinement steps of the suite's refined EK-FAC estimators


@dataclass
class _Context:
    """What building an estimator needs; the EK-FAC reference is fitted once, on demand."""

    problem: Problem
    layers: list[TrackedLayer]
    damping: float | None
    _reference: Curvature | None = None

    def reference(self) -> Curvature:
        """The EK-FAC fit whose per-layer damping the reference estimators match."""
        if self._reference is None:
            self._reference = self.curvature("ekfac")
        return self._reference

    def curvature(self, kind: str, shared_labels: bool = False) -> Curvature:
        p = self.problem
        config = FitConfig(curvature=kind, damping=self.damping, shared_labels=shared_labels)
        return fit_curvature(p.model, p.task, p.loader("train"), self.layers, config,
                             progress=False)

    def reference_damping(self) -> float | str:
        return self.damping if self.damping is not None else "match"


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator of the suite: ``make(context, options) -> Preconditioner``."""

    name: str
    description: str
    make: Callable[[_Context, dict[str, Any]], Preconditioner]


def _curvature_spec(kind: str, description: str) -> EstimatorSpec:
    def make(ctx: _Context, options: dict[str, Any]) -> Preconditioner:
        curvature = ctx.curvature(kind)
        if kind == "ekfac" and ctx._reference is None:
            ctx._reference = curvature
        return curvature

    return EstimatorSpec(kind, description, make)


def _exact(ctx: _Context, options: dict[str, Any]) -> Preconditioner:
    from datasleuth.estimators import ExactInfluence

    p = ctx.problem
    return ExactInfluence.fit(p.model, p.task, p.loader("train"), ctx.layers,
                              damping=ctx.reference_damping(), reference=ctx.reference(),
                              **options)


def _exact_layers(ctx: _Context, options: dict[str, Any]) -> Preconditioner:
    """Exact GGN blocks of each layer, cross-layer blocks dropped (what EK-FAC approximates)."""
    return _exact(ctx, {"block_diagonal": True, **options})


def _cg(ctx: _Context, options: dict[str, Any]) -> Preconditioner:
    from datasleuth.estimators import ConjugateGradient

    p = ctx.problem
    return ConjugateGradient(p.model, p.task, p.loader("train"), ctx.layers,
                             damping=ctx.reference_damping(), reference=ctx.reference(),
                             **options)


def _lissa(ctx: _Context, options: dict[str, Any]) -> Preconditioner:
    from datasleuth.estimators import LiSSA

    p = ctx.problem
    return LiSSA(p.model, p.task, p.loader("train"), ctx.layers,
                 damping=ctx.reference_damping(), reference=ctx.reference(), **options)


def _shared_labels(ctx: _Context, options: dict[str, Any]) -> Preconditioner:
    """EK-FAC as fitted before each pass drew its own labels (FitConfig.shared_labels)."""
    return ctx.curvature("ekfac", shared_labels=True)


def _refined(scheme: str, steps: int, batches: int | None
             ) -> Callable[[_Context, dict[str, Any]], Preconditioner]:
    """The suite's EK-FAC refined by ``scheme`` (docs/method.md §9), from the shared EK-FAC fit."""
    def make(ctx: _Context, options: dict[str, Any]) -> Preconditioner:
        from datasleuth.refine import RefineConfig, RefinedInfluence

        p = ctx.problem
        config = RefineConfig(**{"steps": steps, "scheme": scheme, "batches": batches,
                                 **options})
        return RefinedInfluence(p.model, p.task, ctx.reference(), list(p.loader("train")),
                                config)

    return make


ESTIMATORS: dict[str, EstimatorSpec] = {
    spec.name: spec
    for spec in (
        _curvature_spec("identity", "gradient dot product (no curvature)"),
        _curvature_spec("diagonal", "diagonal Fisher"),
        _curvature_spec("kfac", "K-FAC"),
        _curvature_spec("ekfac", "EK-FAC (Grosse et al. 2023)"),
        EstimatorSpec("exact_ggn", "dense damped Gauss-Newton, Cholesky solve", _exact),
        EstimatorSpec("exact_ggn_layers", "exact per-layer Gauss-Newton blocks "
                      "(block-diagonal, as EK-FAC)", _exact_layers),
        EstimatorSpec("cg", "conjugate gradient with GGN-vector products", _cg),
        EstimatorSpec("lissa", "LiSSA recursion (Agarwal et al. 2017)", _lissa),
        EstimatorSpec("ekfac_shared_labels", "EK-FAC with the same sampled labels in both "
                      "fitting passes (before the fix)", _shared_labels),
        EstimatorSpec("ekfac_refined", f"EK-FAC refined by {REFINE_STEPS} steps of "
                      "EK-FAC-preconditioned CG on the per-layer GGN blocks",
                      _refined("cg", REFINE_STEPS, None)),
        EstimatorSpec("ekfac_astra", f"EK-FAC refined by {REFINE_STEPS} stochastic "
                      "preconditioned Richardson steps, one batch each (ASTRA)",
                      _refined("richardson", REFINE_STEPS, 1)),
    )
}
DEFAULT_ESTIMATORS: tuple[str, ...] = tuple(ESTIMATORS)
