"""datasleuth: trace a model's behaviour back to the training data that caused it.

Influence functions with EK-FAC curvature (Grosse et al. 2023; docs/method.md). The
engine works with any PyTorch model through a :class:`Task`: fit curvature once, then
score queries against training data::

    curvature = fit_curvature(model, task, train_loader)
    scores = pairwise_scores(model, task, curvature, query_loader, train_loader)

``datasleuth.lm`` is the language-model front end (models, corpora, queries, traces),
``datasleuth.scale`` holds query batching, the BM25 filter and the gradient index,
``datasleuth.estimators`` the exact and iterative references, ``datasleuth.evaluation``
the checks of correctness, and ``datasleuth`` the command line tool.
"""

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.estimators import ConjugateGradient, ExactInfluence, LiSSA
from datasleuth.fitting import FitConfig, fit_curvature
from datasleuth.layers import find_layers
from datasleuth.refine import RefineConfig, RefinedInfluence
from datasleuth.scoring import (
    Scores,
    pairwise_scores,
    precondition_queries,
    self_influence,
    token_scores,
    top_k,
)
from datasleuth.storage import load_curvature
from datasleuth.task import ClassificationTask, RegressionTask, Task

__version__ = "0.1.0"

__all__ = [
    "ClassificationTask",
    "ConjugateGradient",
    "Curvature",
    "DatasleuthError",
    "ExactInfluence",
    "FitConfig",
    "LiSSA",
    "RefineConfig",
    "RefinedInfluence",
    "RegressionTask",
    "Scores",
    "Task",
    "find_layers",
    "fit_curvature",
    "load_curvature",
    "pairwise_scores",
    "precondition_queries",
    "self_influence",
    "token_scores",
    "top_k",
]
