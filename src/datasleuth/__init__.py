"""datasleuth: trace a model's behaviour back to the training data that caused it.

Influence functions with EK-FAC curvature (Grosse et al. 2023). The engine works with
any PyTorch model through a :class:`Task`; ``datasleuth.lm`` is the language-model
front end and ``datasleuth`` the command line tool.
"""

from datasleuth.curvature import Curvature, LayerCurvature
from datasleuth.errors import DatasleuthError
from datasleuth.estimators import ConjugateGradient, ExactInfluence, LiSSA
from datasleuth.fitting import FitConfig, fit_curvature
from datasleuth.layers import TrackedLayer, find_layers
from datasleuth.scoring import (
    Preconditioner,
    Scores,
    pairwise_scores,
    precondition_queries,
    scan_scores,
    self_influence,
    token_scores,
    top_k,
)
from datasleuth.storage import load_curvature, save_curvature
from datasleuth.task import ClassificationTask, RegressionTask, Task

__version__ = "0.1.0"

__all__ = [
    "ClassificationTask",
    "ConjugateGradient",
    "Curvature",
    "DatasleuthError",
    "ExactInfluence",
    "FitConfig",
    "LayerCurvature",
    "LiSSA",
    "Preconditioner",
    "RegressionTask",
    "Scores",
    "Task",
    "TrackedLayer",
    "find_layers",
    "fit_curvature",
    "load_curvature",
    "pairwise_scores",
    "precondition_queries",
    "save_curvature",
    "scan_scores",
    "self_influence",
    "token_scores",
    "top_k",
]
