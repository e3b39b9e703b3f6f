"""The evaluation suite, its recipes and ``datasleuth evaluate`` (docs/method.md §8).

The test recipe is ridge regression with a closed-form fit: the damped GGN of the
squared loss is exactly the Hessian X̄ᵀX̄/N + λI of the training objective, so exact
influence is the exact first-order response to reweighting the data. The retrained
output θ(S) = (X̄_SᵀX̄_S/|S| + λI)⁻¹ X̄_Sᵀy_S/|S| is not exactly linear in subset
membership (the matrix inverse depends on S), so the LDS is not exactly 1; with 80
examples in 3 dimensions X̄_SᵀX̄_S/|S| barely moves between 50% subsets and the LDS of
exact influence is close to 1 (we assert > 0.9).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from datasleuth.cli.evaluate import evaluate as evaluate_command
from datasleuth.errors import DatasleuthError
from datasleuth.evaluation.recipes import Recipe, load_recipe
from datasleuth.evaluation.suite import evaluate, parse_estimators

RIDGE_SOURCE = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from datasleuth.evaluation.recipes import Problem, Recipe
    from datasleuth.task import RegressionTask

    LAMBDA = 0.05
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 3, generator=g, dtype=torch.float64)
    Y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(
        80, generator=g, dtype=torch.float64)
    XQ = torch.randn(5, 3, generator=g, dtype=torch.float64)
    CALLS = [0]

    class Output(RegressionTask):
        """Squared-error training; the query measurement is the prediction itself."""

        def measurement(self, model, batch):
            return model(batch[0]).reshape(-1)

    def fit(indices):
        xb = torch.cat([X[indices], torch.ones(len(indices), 1, dtype=torch.float64)], 1)
        h = xb.T @ xb / len(indices) + LAMBDA * torch.eye(4, dtype=torch.float64)
        theta = torch.linalg.solve(h, xb.T @ Y[indices] / len(indices))
        return {"weight": theta[None, :3].clone(), "bias": theta[3:].clone()}

    def train(indices, seed):
        CALLS[0] += 1
        return fit(torch.as_tensor(np.asarray(indices)))

    def measure(state):
        return (XQ @ state["weight"][0] + state["bias"]).numpy()

    def build():
        model = nn.Linear(3, 1).double()
        model.load_state_dict(fit(torch.arange(80)))
        return Problem(model, Output(), TensorDataset(X, Y), TensorDataset(XQ, torch.zeros(5)),
                       batch_size=32, damping=LAMBDA)

    recipe = Recipe("ridge", build, train, measure, "ridge regression, closed form")
''')


@pytest.fixture
def ridge_file(tmp_path):
    path = tmp_path / "ridge_recipe.py"
    path.write_text(RIDGE_SOURCE)
    return path


def test_exact_influence_has_lds_near_one_on_ridge_regression(ridge_file, tmp_path):
    doc = evaluate(str(ridge_file), ["identity", "ekfac", "exact_ggn"], n_subsets=16,
                   cache_dir=tmp_path / "cache")
    exact = doc["estimators"]["exact_ggn"]
    assert exact["lds"]["mean"] > 0.9
    assert len(exact["lds"]["per_query"]) == 5
    assert exact["vs_exact"]["mean_pearson"] == pytest.approx(1.0)
    assert exact["damping"] == pytest.approx(0.05)
    assert doc["retraining"] == pytest.approx(
        {**doc["retraining"], "models": 16, "trained": 16, "cached": 0})
    json.dumps(doc, allow_nan=False)  # strictly JSON-serialisable


def test_cache_prevents_retraining_on_a_second_run(ridge_file, tmp_path):
    recipe = load_recipe(str(ridge_file))
    calls = [0]

    def counting_train(indices: np.ndarray, seed: int):
        calls[0] += 1
        return recipe.train(indices, seed)

    counted = Recipe("ridge", recipe.build, counting_train, recipe.measure,
                     fingerprint=recipe.fingerprint)
    first = evaluate(counted, ["exact_ggn"], n_subsets=6, seeds_per_subset=2,
                     cache_dir=tmp_path / "cache")
    assert calls[0] == 12
    second = evaluate(counted, ["exact_ggn", "identity"], n_subsets=6, seeds_per_subset=2,
                      cache_dir=tmp_path / "cache", out=tmp_path / "out")
    assert calls[0] == 12
    assert second["retraining"]["cached"] == 12 and second["retraining"]["trained"] == 0
    assert second["estimators"]["exact_ggn"]["lds"] == first["estimators"]["exact_ggn"]["lds"]
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["estimators"]["identity"]["lds"]["mean"] == pytest.approx(
        second["estimators"]["identity"]["lds"]["mean"])


def test_cli_runs_a_recipe_file_and_writes_results(ridge_file, tmp_path):
    result = CliRunner().invoke(evaluate_command, [
        "--recipe", str(ridge_file), "--estimators", "identity,exact_ggn", "--subsets", "4",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
        "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "| estimator | LDS mean | ± std | seconds | Pearson vs exact |" in result.output
    assert "| exact_ggn |" in result.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(doc["estimators"]) == {"identity", "exact_ggn"}


def test_cli_on_builtin_digits_mislabeled_prints_detection(tmp_path):
    threads = torch.get_num_threads()
    try:  # one thread: the tiny MLP only loses time to contention on shared cores
        result = CliRunner().invoke(evaluate_command, [
            "--recipe", "digits-mislabeled", "--estimators", "identity,ekfac", "--subsets", "0",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--threads", "1", "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    detectors = doc["detection"]["detectors"]
    assert set(detectors) == {"identity", "ekfac", "train_loss"}
    assert detectors["ekfac"]["auc"] > 0.8  # flipped labels stand out by self-influence
    assert "self-influence (ekfac)" in result.output
    assert doc["estimators"]["ekfac"].get("lds") is None


@pytest.mark.parametrize("call, fragment", [
    (lambda: load_recipe("no-such-recipe"), "unknown recipe 'no-such-recipe'"),
    (lambda: load_recipe("missing/recipe.py"), "does not exist"),
    (lambda: parse_estimators("ekfac,bogus"), "unknown estimator(s) 'bogus'"),
    (lambda: parse_estimators(""), "unknown estimator(s)"),
])
def test_bad_input_raises_one_line_errors(call, fragment):
    with pytest.raises(DatasleuthError) as info:
        call()
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_recipe_file_and_settings_are_refused(tmp_path, ridge_file):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(DatasleuthError, match="defines neither"):
        load_recipe(str(empty))
    with pytest.raises(DatasleuthError, match="n_subsets=1"):
        evaluate(str(ridge_file), ["identity"], n_subsets=1)
    result = CliRunner().invoke(evaluate_command, ["--recipe", "nope", "--no-progress"])
    assert isinstance(result.exception, DatasleuthError)
    result = CliRunner().invoke(evaluate_command, ["--estimators", "ekfac,nope"])
    assert isinstance(result.exception, DatasleuthError)
    assert "choose from identity" in str(result.exception)
