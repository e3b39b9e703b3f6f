"""Ground truth (docs/method.md §8): PBRF responses and leave-one-out retraining."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import loader
from test_estimators import ridge_problem

from datasleuth import ClassificationTask, DatasleuthError, RegressionTask, pairwise_scores
from datasleuth.estimators import ExactInfluence
from datasleuth.evaluation.ground_truth import (
    PBRF,
    compare,
    leave_one_out,
    pbrf_response,
    pbrf_scores,
)


def test_pbrf_equals_exact_damped_influence_on_linear_regression():
    """Linear model + Gaussian KL: the PBRF objective is quadratic, θ_ε − θs =
    −ε(G + λI + εH_m)⁻¹∇L_m, so the response is the damped GGN influence up to O(ε)
    (one-sided) or O(ε²) (central)."""
    model, x, y, _, _ = ridge_problem(n=30)
    task = RegressionTask()
    queries = loader(x[:4], y[:4] + 0.5)
    exact = ExactInfluence.fit(model, task, loader(x, y), damping=0.05)
    want = pairwise_scores(model, task, exact, queries, loader(x, y), progress=False).total
    idx = [0, 7, 29]
    got = pbrf_scores(model, task, loader(x, y), queries, idx, damping=0.05, epsilon=1e-5,
                      central=True)
    torch.testing.assert_close(got, want[:, idx], rtol=1e-6, atol=1e-9)
    one_sided = pbrf_response(model, task, loader(x, y), queries, (x[7:8], y[7:8]),
                              damping=0.05, epsilon=1e-4)
    torch.testing.assert_close(one_sided, want[:, 7], rtol=1e-3, atol=1e-6)
    coarse = pbrf_response(model, task, loader(x, y), queries, (x[7:8], y[7:8]),
                           damping=0.05, epsilon=0.5)  # finite ε: a different quantity
    assert (coarse - want[:, 7]).abs().max() > 1e-3 * want[:, 7].abs().max()


def test_pbrf_equals_exact_ggn_influence_on_an_mlp(mlp_data):
    """At small ε the PBRF of any network is the joint damped GGN influence (same sign,
    not divided by N), with per-layer damping too."""
    model, x, y = mlp_data
    task = ClassificationTask()
    damping = {"0": 0.05, "2": 0.02}
    exact = ExactInfluence.fit(model, task, loader(x, y), damping=damping)
    queries = loader(x[:3], y[:3])
    want = pairwise_scores(model, task, exact, queries, loader(x, y), progress=False).total
    pbrf = PBRF(model, task, loader(x, y), queries, damping=damping)
    for i in (2, 11):
        got = pbrf.response((x[i : i + 1], y[i : i + 1]), epsilon=1e-4, central=True)
        torch.testing.assert_close(got, want[:, i], rtol=1e-5, atol=1e-8)  # O(ε²) apart
    assert want[2, 2] > 0  # an example raises its own log-likelihood
    lbfgs = pbrf_response(model, task, loader(x, y), queries, (x[2:3], y[2:3]),
                          damping=damping, epsilon=1e-3, method="lbfgs", central=True)
    torch.testing.assert_close(lbfgs, want[:, 2], rtol=1e-3, atol=1e-6)


def test_pbrf_with_adam_and_the_warning_when_not_converged(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    exact = ExactInfluence.fit(model, task, loader(x, y), damping=0.1)
    queries = loader(x[:2], y[:2])
    want = pairwise_scores(model, task, exact, queries, loader(x, y), progress=False).total
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = pbrf_response(model, task, loader(x, y), queries, (x[5:6], y[5:6]),
                            damping=0.1, method="adam", steps=300, lr=0.05)
    assert compare(got, want[:, 5])["relative_error"] < 0.05
    with pytest.warns(RuntimeWarning, match="raise steps"):
        pbrf_response(model, task, loader(x, y), queries, (x[5:6], y[5:6]), damping=0.1,
                      method="lbfgs", steps=2)


def test_leave_one_out_sign_scale_and_seed_average():
    values = np.array([0.5, -2.0, 3.0, 0.25, 1.0])

    def train_fn(keep, seed):
        return keep, seed

    def measure_fn(state):  # two "queries": sum of kept values, and a seed-dependent one
        keep, seed = state
        return np.array([values[keep].sum(), (seed + 1) * values[keep].sum()])

    got = leave_one_out(train_fn, measure_fn, 5, [4, 1, 2], seeds=[0, 2])
    want = np.stack([values[[4, 1, 2]], 2.0 * values[[4, 1, 2]]])  # mean of 1× and 3×
    assert got.dtype == torch.float64 and got.shape == (2, 3)
    np.testing.assert_allclose(got.numpy(), want)
    assert got[0, 2] > 0  # adding an example with positive value raises f


def test_compare_reports_correlations_error_and_scale():
    g = torch.Generator().manual_seed(0)
    est = torch.randn(3, 40, generator=g, dtype=torch.float64)
    out = compare(est, est / 40)
    assert out["mean_pearson"] == pytest.approx(1.0) and out["spearman_all"] == pytest.approx(1)
    assert out["scale"] == pytest.approx(1 / 40) and out["n_queries"] == 3
    assert out["relative_error"] == pytest.approx(39.0)
    assert math.isnan(compare(torch.ones(5), torch.arange(5.0))["pearson_all"])


def test_ground_truth_input_errors(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    with pytest.raises(DatasleuthError, match="indices"):
        leave_one_out(lambda k, s: k, lambda s: [0.0], 3, [3])
    with pytest.raises(DatasleuthError, match="seeds"):
        leave_one_out(lambda k, s: k, lambda s: [0.0], 3, [0], seeds=[])
    with pytest.raises(DatasleuthError, match="epsilon"):
        pbrf_response(model, task, loader(x, y), loader(x[:1], y[:1]), (x[:1], y[:1]),
                      epsilon=0.0)
    with pytest.raises(DatasleuthError, match="example_fn"):
        pbrf_scores(model, task, [(x, y)], [(x[:1], y[:1])], [0])
    with pytest.raises(DatasleuthError, match="method"):
        PBRF(model, task, loader(x, y), loader(x[:1], y[:1]), method="sgd")
