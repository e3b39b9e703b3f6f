"""Tests for datasleuth.evaluation: correlations, detection, LDS (+ driver), sparsity."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from datasleuth.errors import DatasleuthError
from datasleuth.evaluation import (
    compare_detectors,
    correlations,
    detection_auc,
    detection_curve,
    fit_power_law,
    lds,
    make_subsets,
    pearson,
    recall_at_k,
    run_lds_experiments,
    sparsity_report,
    spearman,
    top_k_overlap,
    top_share,
)

# ---------------------------------------------------------------- correlations


def test_pearson_spearman_match_scipy_with_ties() -> None:
    x = np.array([1.0, 2.0, 2.0, 3.5, 7.0, -1.0, 0.0, 4.0])
    y = np.array([0.5, 1.0, 3.0, 3.0, 10.0, -2.0, 1.0, 2.0])
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    # Spearman is invariant to a monotone transform; Pearson is not.
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert pearson(x, np.exp(x)) < 0.99
    assert pearson(x, -2 * x + 1) == pytest.approx(-1.0)


def test_correlations_degenerate_inputs_are_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
        assert math.isnan(spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
        assert math.isnan(spearman([1.0], [2.0]))
        assert math.isnan(pearson([1.0, np.nan, 3.0], [1.0, 2.0, 3.0]))
        out = correlations([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert math.isnan(out["pearson"][0]) and math.isnan(out["spearman"][0])
    assert out["mean_pearson"] == pytest.approx(-1.0)  # the nan row is skipped
    assert out["mean_spearman"] == pytest.approx(-1.0)
    with pytest.raises(DatasleuthError):
        pearson([1.0, 2.0], [1.0, 2.0, 3.0])


def test_correlations_per_row_and_mean() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 50))
    b = a + 0.5 * rng.normal(size=(3, 50))
    out = correlations(a, b)
    expected_p = [stats.pearsonr(a[i], b[i])[0] for i in range(3)]
    expected_s = [stats.spearmanr(a[i], b[i])[0] for i in range(3)]
    np.testing.assert_allclose(out["pearson"], expected_p, atol=1e-12)
    np.testing.assert_allclose(out["spearman"], expected_s, atol=1e-12)
    assert out["mean_pearson"] == pytest.approx(np.mean(expected_p))
    assert out["n_queries"] == 3 and out["n_train"] == 50
    json.dumps(out)
    one = correlations(a[0], b[0])  # 1-D is one query
    assert one["pearson"] == [pytest.approx(expected_p[0])]


def test_top_k_overlap_and_recall_at_k() -> None:
    a = np.array([9.0, 8.0, 7.0, 1.0, 0.0, -1.0])
    b = np.array([9.0, 0.0, 7.0, 8.0, 1.0, -1.0])
    assert top_k_overlap(a, b, 3) == pytest.approx(2 / 3)  # {0,1,2} vs {0,3,2}
    assert top_k_overlap(a, a, 6) == 1.0
    assert top_k_overlap(np.stack([a, a]), np.stack([a, b]), 3) == pytest.approx((1 + 2 / 3) / 2)
    exact = [4, 2, 7, 1]
    approx = [2, 9, 4, 3, 1, 7]
    assert recall_at_k(approx, exact, 2) == pytest.approx(0.5)  # {2,9} holds 2 of {4,2}
    assert recall_at_k(approx, exact, 3) == pytest.approx(2 / 3)  # {2,9,4} vs {4,2,7}
    assert recall_at_k(approx, exact, 4, approx_k=6) == 1.0  # candidate set of 6
    with pytest.raises(DatasleuthError):
        top_k_overlap(a, b, 0)


# ---------------------------------------------------------------- detection


def test_detection_curve_hand_built() -> None:
    # 10 examples, corrupt = {2, 7, 9}; ranking by score: 7, 0, 2, 1, 3, 4, 5, 6, 8, 9
    score = np.array([9.0, 8.0, 8.5, 7.0, 6.0, 5.0, 4.0, 10.0, 3.0, 2.0])
    corrupt = np.zeros(10, dtype=bool)
    corrupt[[2, 7, 9]] = True
    curve = detection_curve(score, corrupt, fractions=(0.1, 0.3, 0.5, 0.9, 1.0))
    assert curve["n_inspected"] == [1, 3, 5, 9, 10]
    np.testing.assert_allclose(curve["found"], [1 / 3, 2 / 3, 2 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(curve["random"], [0.1, 0.3, 0.5, 0.9, 1.0])
    assert curve["n_corrupt"] == 3 and curve["n"] == 10
    # 3 corrupt x 7 clean pairs; corrupt 7 beats all 7, corrupt 2 beats 6, corrupt 9 beats 0
    assert detection_auc(score, corrupt) == pytest.approx(13 / 21)


def test_auc_matches_sklearn_and_compare_detectors() -> None:
    rng = np.random.default_rng(0)
    n = 400
    corrupt = rng.random(n) < 0.1
    influence = rng.normal(size=n) + 3.0 * corrupt  # a good detector
    loss = rng.normal(size=n) + 0.5 * corrupt  # a weak baseline
    assert detection_auc(influence, corrupt) == pytest.approx(roc_auc_score(corrupt, influence))
    report = compare_detectors({"self_influence": influence, "train_loss": loss}, corrupt)
    json.dumps(report)
    det = report["detectors"]
    assert set(det) == {"self_influence", "train_loss"}
    assert det["self_influence"]["auc"] == pytest.approx(roc_auc_score(corrupt, influence))
    assert det["train_loss"]["auc"] == pytest.approx(roc_auc_score(corrupt, loss))
    assert det["self_influence"]["auc"] > det["train_loss"]["auc"] > 0.5
    # at 20% inspected, the strong detector finds most corrupt examples
    i20 = report["fractions"].index(0.2)
    assert det["self_influence"]["found"][i20] > 0.8 > det["train_loss"]["found"][i20]
    with pytest.raises(DatasleuthError):
        detection_auc(influence, np.ones(n, dtype=bool))
    with pytest.raises(DatasleuthError):
        detection_curve(influence, corrupt[:-1])


# ---------------------------------------------------------------- LDS


def test_make_subsets_sizes_determinism_and_prefix() -> None:
    s = make_subsets(20, 8, fraction=0.5, seed=3)
    assert s.shape == (8, 20) and s.dtype == bool
    assert (s.sum(axis=1) == 10).all()
    np.testing.assert_array_equal(s, make_subsets(20, 8, 0.5, seed=3))
    np.testing.assert_array_equal(s, make_subsets(20, 12, 0.5, seed=3)[:8])
    assert not np.array_equal(s, make_subsets(20, 8, 0.5, seed=4))
    assert (make_subsets(10, 3, fraction=0.3).sum(axis=1) == 3).all()
    with pytest.raises(DatasleuthError):
        make_subsets(10, 5, fraction=1.0)


def test_lds_is_one_for_linear_outputs() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(4, 60))
    subsets = make_subsets(60, 30, seed=1)
    sums = subsets.astype(float) @ scores.T  # (J, Q)
    outputs = 2.0 * sums + 5.0
    res = lds(scores, subsets, outputs)
    np.testing.assert_allclose(res.per_query, 1.0)
    assert res.mean == pytest.approx(1.0)
    # a monotone (non-linear) transform keeps Spearman at 1; negated outputs give -1
    assert lds(scores, subsets, np.exp(sums / 10)).mean == pytest.approx(1.0)
    assert lds(scores, subsets, -sums).mean == pytest.approx(-1.0)
    # (J, seeds, Q): seed noise that averages out exactly
    noise = rng.normal(size=(30, 1, 4))
    stacked = np.concatenate([outputs[:, None] + noise, outputs[:, None] - noise], axis=1)
    assert lds(scores, subsets, stacked).mean == pytest.approx(1.0)


def test_lds_hand_computed() -> None:
    scores = np.array([1.0, 2.0, 4.0])
    subsets = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=bool)
    # predictions 1, 2, 4, 3 (ranks 1 2 4 3); output ranks 1 3 2 4: sum d^2 = 6
    outputs = np.array([10.0, 300.0, 20.0, 4000.0])  # Pearson would differ
    res = lds(scores, subsets, outputs)
    assert res.per_query.shape == (1,)
    assert res.mean == pytest.approx(1 - 6 * 6 / (4 * 15))  # 0.4
    assert res.to_dict() == {"mean": pytest.approx(0.4), "per_query": [pytest.approx(0.4)]}
    with pytest.raises(DatasleuthError):
        lds(scores, subsets, np.ones((3, 1)))
    with pytest.raises(DatasleuthError):
        lds(scores, subsets.astype(int), outputs)


class _Counter:
    """train_fn that records its calls; the 'model' is the weighted sum over the subset."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def train(self, indices: np.ndarray, seed: int) -> dict[str, torch.Tensor]:
        assert indices.dtype == np.int64 and np.all(np.diff(indices) > 0)
        self.calls.append((tuple(indices.tolist()), seed))
        total = self.weights[indices].sum(axis=0)  # (Q,)
        return {"total": torch.tensor(total), "seed": torch.tensor([float(seed)])}


def _measure(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return state["total"] + 1e-3 * state["seed"]  # tiny per-seed effect


def test_run_lds_experiments_caches_and_refuses_mismatch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n, q = 24, 3
    weights = rng.normal(size=(n, q))
    counter = _Counter(weights)
    kw = dict(n_subsets=6, seeds_per_subset=2, cache_dir=tmp_path, fingerprint="toy-v1")
    subsets, outputs = run_lds_experiments(counter.train, _measure, n, progress=False, **kw)
    assert subsets.shape == (6, n) and outputs.shape == (6, 2, q)
    assert len(counter.calls) == 12
    assert len(set(counter.calls)) == 12  # each (subset, seed) trained once
    assert {seed for _, seed in counter.calls} == set(range(12))
    for j in range(6):
        np.testing.assert_array_equal(counter.calls[2 * j][0], np.flatnonzero(subsets[j]))
    # the 'model' is exactly linear in the subset, so the true weights give LDS 1
    assert lds(weights.T, subsets, outputs).mean == pytest.approx(1.0)

    # second run: nothing retrained, identical results
    subsets2, outputs2 = run_lds_experiments(counter.train, _measure, n, progress=False, **kw)
    assert len(counter.calls) == 12
    np.testing.assert_array_equal(subsets2, subsets)
    np.testing.assert_array_equal(outputs2, outputs)

    # growing n_subsets trains only the new subsets
    kw_more = {**kw, "n_subsets": 8}
    _, outputs3 = run_lds_experiments(counter.train, _measure, n, progress=False, **kw_more)
    assert len(counter.calls) == 16
    np.testing.assert_array_equal(outputs3[:6], outputs)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))

    # a different fingerprint (or n_train / fraction) is refused, without training
    with pytest.raises(DatasleuthError, match="fingerprint") as err:
        run_lds_experiments(
            counter.train, _measure, n, progress=False, **{**kw, "fingerprint": "toy-v2"}
        )
    assert "\n" not in str(err.value)
    with pytest.raises(DatasleuthError, match="fraction"):
        run_lds_experiments(counter.train, _measure, n, fraction=0.25, progress=False, **kw)
    assert len(counter.calls) == 16

    # an entry whose own metadata disagrees (e.g. copied from another cache) is refused
    entries = sorted(tmp_path.glob("lds_*.safetensors"))
    assert len(entries) == 16
    other = tmp_path / "other"
    other_counter = _Counter(weights)
    run_lds_experiments(
        other_counter.train,
        _measure,
        n,
        progress=False,
        **{**kw, "cache_dir": other, "fingerprint": "toy-v2"},
    )
    target = entries[0]
    target.write_bytes((other / target.name).read_bytes())
    with pytest.raises(DatasleuthError, match="fingerprint"):
        run_lds_experiments(counter.train, _measure, n, progress=False, **kw)


def test_run_lds_experiments_saves_states(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    weights = np.arange(10, dtype=np.float64)[:, None]
    counter = _Counter(weights)
    run_lds_experiments(
        counter.train,
        _measure,
        10,
        n_subsets=3,
        cache_dir=tmp_path,
        save_states=True,
        progress=False,
    )
    states = sorted(tmp_path.glob("state_*.safetensors"))
    assert len(states) == 3
    loaded = load_file(states[0])
    assert set(loaded) == {"total", "seed"}

    def bad_measure(state: object) -> np.ndarray:
        return np.array([np.nan])

    with pytest.raises(DatasleuthError, match="non-finite"):
        run_lds_experiments(
            counter.train,
            bad_measure,
            10,
            n_subsets=3,
            cache_dir=tmp_path / "b",
            progress=False,
        )


# ---------------------------------------------------------------- sparsity


def test_fit_power_law_recovers_alpha_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    alpha = 2.5
    # Pareto with xmin = 1 and density ~ x^-alpha (numpy's pareto(a) + 1 has alpha = a + 1)
    tail = rng.pareto(alpha - 1.0, size=4000) + 1.0
    body = -rng.exponential(size=500)  # negative scores are ignored
    scores = rng.permutation(np.concatenate([tail, body]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_power_law(scores)
        fixed = fit_power_law(scores, xmin=1.0)
    assert capsys.readouterr().out == ""
    assert abs(fit.alpha - alpha) < 0.1
    assert abs(fixed.alpha - alpha) < 0.1
    assert fixed.xmin == pytest.approx(1.0) and fixed.n_tail == 4000
    assert fit.n_positive == 4000 and 0 < fit.n_tail <= 4000
    assert 0 <= fit.ks_distance < 0.05
    assert fit.exponential_R > 0 and fit.exponential_p < 0.01  # power law beats exponential
    json.dumps(fit.to_dict(), allow_nan=False)
    with pytest.raises(DatasleuthError):
        fit_power_law(np.array([1.0, 2.0, -3.0]))


def test_top_share_hand_example() -> None:
    # 200 examples: top 1% = the 2 largest; negative scores add no positive mass
    scores = np.concatenate([[30.0, 20.0], np.full(197, 0.25), [-5.0]])
    total = 30.0 + 20.0 + 197 * 0.25
    assert top_share(scores, 0.01) == pytest.approx(50.0 / total)
    assert top_share(scores, 1.0) == pytest.approx(1.0)
    assert top_share([4.0, 1.0, -10.0, 0.0], 0.25) == pytest.approx(0.8)
    assert math.isnan(top_share([-1.0, 0.0], 0.5))


def test_sparsity_report_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    scores = np.concatenate([rng.pareto(1.0, size=1000) + 1.0, -rng.random(100)])
    report = sparsity_report(scores)
    json.dumps(report, allow_nan=False)
    assert report["n"] == 1100 and report["n_positive"] == 1000 and report["n_negative"] == 100
    assert report["top_share"]["0.01"] == pytest.approx(top_share(scores, 0.01))
    assert report["power_law"]["alpha"] == pytest.approx(fit_power_law(scores).alpha)
    small = sparsity_report(np.array([1.0, 2.0, -1.0]))
    assert small["power_law"] is None and "positive" in small["power_law_note"]
    both = sparsity_report(np.stack([scores[:500], scores[500:1000]]))
    assert len(both["per_query"]) == 2
    assert capsys.readouterr().out == ""
