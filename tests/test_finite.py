"""Non-finite values are caught where they are made and named by layer and stage."""

from __future__ import annotations

import pytest
import torch
from conftest import loader
from torch import nn

from datasleuth.curvature import Curvature, LayerCurvature
from datasleuth.errors import DatasleuthError
from datasleuth.finite import check_scores
from datasleuth.fitting import FitConfig, fit_curvature
from datasleuth.scoring import pairwise_scores, self_influence
from datasleuth.task import ClassificationTask


def overflowing(mlp_data):
    """Finite weights whose second layer's inputs overflow their covariance (1e200² = Inf)."""
    model, x, y = mlp_data
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[0].weight.mul_(1e200)
    return model, x, y


def test_nan_weights_are_named_before_fitting(mlp_data):
    model, x, y = mlp_data
    with torch.no_grad():
        model[2].weight[1, 1] = float("nan")
    with pytest.raises(DatasleuthError, match=r"layer 2: the weight 2.weight holds NaN; check "
                                              "the model's weights"):
        fit_curvature(model, ClassificationTask(), loader(x, y), progress=False)


@pytest.mark.parametrize(("curvature", "stage"), [
    ("ekfac", "the input covariance holds (Inf|NaN) after batch 0"),
    ("kfac", "the input covariance holds (Inf|NaN) after batch 0"),
    ("diagonal", "the eigenvalue sum holds (Inf|NaN) after batch 0"),
])
def test_overflowing_activations_are_named_by_layer_and_stage(mlp_data, curvature, stage):
    model, x, y = overflowing(mlp_data)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(DatasleuthError, match=f"layer 1: {stage}; check the model's weights"):
        fit_curvature(model, ClassificationTask(), loader(x, y),
                      config=FitConfig(curvature, fisher="empirical"), progress=False)


def _identity(model: nn.Module) -> Curvature:
    layers = {name: LayerCurvature(torch.zeros(m.out_features, m.in_features + 1,
                                               dtype=torch.float64), 1.0)
              for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return Curvature("identity", layers, {})


def test_non_finite_scores_are_named_not_dropped(mlp_data):
    model, x, y = overflowing(mlp_data)
    curv, task = _identity(model), ClassificationTask()
    with pytest.raises(DatasleuthError, match="layer 1: the self-influence scores holds (Inf|NaN) "
                                              "in the batch starting at sequence 0"):
        self_influence(model, task, curv, loader(x, y), progress=False)
    with pytest.raises(DatasleuthError, match="layer 1: the scores holds (Inf|NaN)"):
        pairwise_scores(model, task, curv, loader(x[:2], y[:2]), loader(x, y), progress=False)


def test_check_scores_names_the_first_bad_layer_only_when_there_is_one():
    scores = torch.zeros(2, 3, 2, dtype=torch.float64)
    check_scores(scores, ["a", "b"], 0)  # finite: nothing
    scores[1, 2, 1] = float("-inf")
    with pytest.raises(DatasleuthError, match="layer b: the scores holds Inf in the batch "
                                              "starting at sequence 5"):
        check_scores(scores, ["a", "b"], 5)


def test_non_finite_logits_refuse_sampled_labels_with_one_line():
    """Finite weights whose logits overflow: the sampled Fisher says so (no multinomial
    traceback)."""
    model = nn.Sequential(nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].weight.fill_(1e308)
    x = torch.ones(2, 4, dtype=torch.float64) * 1e10
    batch = (x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(DatasleuthError, match="logits hold NaN or Inf"):
        ClassificationTask().sampled_loss(model, batch, torch.Generator().manual_seed(0))
