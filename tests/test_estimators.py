"""Reference estimators (exact, CG, LiSSA) against closed forms, dense oracles and LOO."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import lm_batch, loader, tiny_gpt2
from oracles import dense_ggn, dense_influence, loop_gradients
from test_curvature import _exact_kfac_regression
from torch import nn
from torch.func import functional_call, hessian
from torch.utils.data import DataLoader, TensorDataset

from datasleuth import (
    ClassificationTask,
    DatasleuthError,
    FitConfig,
    RegressionTask,
    Task,
    find_layers,
    fit_curvature,
    pairwise_scores,
    self_influence,
)
from datasleuth.estimators import (
    ConjugateGradient,
    ExactInfluence,
    LiSSA,
    output_adapter,
)
from datasleuth.evaluation.ground_truth import compare, leave_one_out
from datasleuth.lm.task import CausalLMTask

RIDGE = 1e-3


class LinearMeasurement(RegressionTask):
    """f = first model output: linear in θ, so leave-one-out has a closed form."""

    def measurement(self, model, batch):
        return model(batch[0])[:, 0]


def ridge_problem(n: int = 40, m: int = 3, p: int = 2, lam: float = RIDGE):
    """Linear model trained to the exact optimum of (1/N) Σ ½‖W̄x̄ − y‖² + (λ/2)‖W̄‖²."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    y = x @ torch.randn(m, p, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n, p, generator=g, dtype=torch.float64)
    xbar = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)  # (N, M+1)

    def fit(keep: np.ndarray) -> torch.Tensor:
        xk, yk = xbar[keep], y[keep]
        a = xk.t() @ xk / n + lam * torch.eye(m + 1, dtype=torch.float64)  # 1/N: full N
        return torch.linalg.solve(a, xk.t() @ yk / n).t()  # W̄ (P, M+1)

    model = nn.Linear(m, p).double()
    wbar = fit(np.arange(n))
    with torch.no_grad():
        model.weight.copy_(wbar[:, :m])
        model.bias.copy_(wbar[:, m])
    return model, x, y, xbar, fit


def test_exact_equals_closed_form_on_linear_regression():
    model, x, y, xbar, _ = ridge_problem()
    a = xbar.t() @ xbar / len(x)  # E[x̄x̄ᵀ]; G = I_P ⊗ A in row-major vec(W̄)
    v = torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for kind in ("exact_ggn", "exact_hessian"):
        est = ExactInfluence.fit(model, RegressionTask(), loader(x, y, 7), kind=kind,
                                 damping=0.1)
        assert est.layer_names == [""]  # the root module is the tracked layer
        torch.testing.assert_close(est.matrix, torch.kron(torch.eye(2, dtype=torch.float64), a))
        want = v @ torch.linalg.inv(a + 0.1 * torch.eye(4, dtype=torch.float64))
        torch.testing.assert_close(est.precondition({"": v})[""], want, rtol=1e-12, atol=1e-12)


def test_exact_scores_over_n_are_leave_one_out_for_ridge():
    """f(full) − f(without i) = score_i / (N (1 − h_i)) exactly for ridge regression with a
    linear f (Sherman-Morrison), h_i the leverage; so score / N is LOO up to O(h)."""
    model, x, y, xbar, fit = ridge_problem()
    n, xq = len(x), torch.randn(3, 3, generator=torch.Generator().manual_seed(9),
                                dtype=torch.float64)
    queries = [(xq, torch.zeros(3, 2, dtype=torch.float64))]
    xqbar = torch.cat([xq, torch.ones(3, 1, dtype=torch.float64)], 1)
    est = ExactInfluence.fit(model, RegressionTask(), loader(x, y), damping=RIDGE)
    scores = pairwise_scores(model, LinearMeasurement(), est, queries, loader(x, y, 6),
                             progress=False).total  # (Q, N)
    loo = leave_one_out(lambda keep, seed: fit(keep), lambda w: (xqbar @ w.t())[:, 0],
                        n, range(n))
    a = xbar.t() @ xbar + n * RIDGE * torch.eye(4, dtype=torch.float64)
    lev = torch.einsum("nm,mk,nk->n", xbar, torch.linalg.inv(a), xbar)  # h_i
    torch.testing.assert_close(loo * (1 - lev), scores / n, rtol=1e-9, atol=1e-14)
    # with the nonlinear default measurement f = −L(query): still ≈ score / N
    qy = [(xq, torch.randn(3, 2, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64))]
    scores = pairwise_scores(model, RegressionTask(), est, qy, loader(x, y), progress=False)
    loo = leave_one_out(
        lambda keep, seed: fit(keep),
        lambda w: -0.5 * ((xqbar @ w.t()) - qy[0][1]).square().sum(1), n, range(n))
    cmp = compare(scores.total, loo)
    assert cmp["mean_pearson"] > 0.99 and cmp["pearson_all"] > 0.99, cmp
    assert cmp["scale"] == pytest.approx(1 / n, rel=0.15)  # mean leverage (M+1)/N = 0.1
    cmp = compare(scores.total / n, loo * (1 - lev))  # only f's curvature is left
    assert cmp["relative_error"] < 5e-2 and cmp["pearson_all"] > 0.999, cmp


def _train_logistic(model, x, y, lam, keep=None, start=None):
    """Minimise (1/N) Σ_{i∈keep} CE + (λ/2)‖θ‖² by L-BFGS (N = the full size)."""
    keep = torch.arange(len(x)) if keep is None else torch.as_tensor(keep)
    params = [p.detach().clone().requires_grad_(True) for p in (start or model.parameters())]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-13,
                            tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = x[keep] @ params[0].t() + params[1]
        obj = F.cross_entropy(logits, y[keep], reduction="sum") / len(x)
        obj = obj + 0.5 * lam * sum(p.square().sum() for p in params)
        obj.backward()
        return obj

    opt.step(closure)
    return [p.detach() for p in params]


def test_exact_ggn_influence_predicts_logistic_regression_leave_one_out():
    g = torch.Generator().manual_seed(4)
    n, lam = 100, 1e-2
    x = torch.randn(n + 6, 4, generator=g, dtype=torch.float64)
    y = (x[:, :3] + 0.8 * torch.randn(n + 6, 3, generator=g, dtype=torch.float64)).argmax(1)
    xq, yq, x, y = x[n:], y[n:], x[:n], y[:n]
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    full = _train_logistic(model, x, y, lam)
    with torch.no_grad():
        model.weight.copy_(full[0])
        model.bias.copy_(full[1])
    task = ClassificationTask()
    est = ExactInfluence.fit(model, task, loader(x, y, 9), damping=lam)
    scores = pairwise_scores(model, task, est, loader(xq, yq), loader(x, y), progress=False)

    def measure(params):
        return -F.cross_entropy(xq @ params[0].t() + params[1], yq, reduction="none")

    loo = leave_one_out(lambda keep, seed: _train_logistic(model, x, y, lam, keep, full),
                        measure, n, range(n))
    cmp = compare(scores.total / n, loo)
    assert cmp["pearson_all"] > 0.99 and min(cmp["pearson"]) > 0.99, cmp
    assert cmp["scale"] == pytest.approx(1.0, rel=0.15)  # LOO = score / (N (1 − h))


def test_block_diagonal_exact_matches_dense_per_layer_oracle(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    damping = {"0": 0.03, "2": 0.01}
    est = ExactInfluence.fit(model, task, loader(x, y, 4), damping=damping, block_diagonal=True)
    layers = find_layers(model)
    ggn = {layer.name: dense_ggn(
        model, layer, [(x[i], y[i]) for i in range(len(x))],
        lambda m, params, ex: functional_call(m, params, (ex[0][None],))[0],
        lambda out, ex: F.cross_entropy(out[None], ex[1][None], reduction="sum"))
        for layer in layers}
    qg = loop_gradients(model, layers, [(x[i : i + 1], y[i : i + 1]) for i in range(4)],
                        lambda m, ex: task.measurement(m, ex).sum())
    tg = loop_gradients(model, layers, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))],
                        lambda m, ex: task.loss(m, ex).sum())
    got = pairwise_scores(model, task, est, loader(x[:4], y[:4]), loader(x, y), progress=False)
    torch.testing.assert_close(got.total, dense_influence(qg, tg, ggn, damping))
    torch.testing.assert_close(est.matrix[:30, 30:], torch.zeros(30, 21, dtype=torch.float64))
    joint = ExactInfluence.fit(model, task, loader(x, y), damping=damping)
    torch.testing.assert_close(joint.matrix[:30, :30], ggn["0"])
    torch.testing.assert_close(joint.matrix[30:, 30:], ggn["2"])
    assert joint.matrix[:30, 30:].abs().max() > 1e-3  # the joint G couples the layers


def test_exact_block_diagonal_agrees_with_ekfac_where_kfac_is_exact():
    model, x, xs, ys = _exact_kfac_regression()
    data = DataLoader(TensorDataset(xs, ys), batch_size=4)
    task = RegressionTask()
    curv = fit_curvature(model, task, data, None,
                         FitConfig(curvature="ekfac", fisher="empirical"), progress=False)
    est = ExactInfluence.fit(model, task, data, damping="match", reference=curv,
                             block_diagonal=True)
    name = curv.layer_names[0]
    torch.testing.assert_close(est.dense(), curv.layers[name].dense(), rtol=1e-9, atol=1e-12)
    queries = [(xs[:3], ys[:3])]
    want = pairwise_scores(model, task, curv, queries, data, progress=False).total
    got = pairwise_scores(model, task, est, queries, data, progress=False).total
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_cg_converges_to_exact(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    for block in (False, True):
        exact = ExactInfluence.fit(model, task, loader(x, y, 23), damping=1e-2,
                                   block_diagonal=block)
        cg = ConjugateGradient(model, task, loader(x, y, 23), damping=1e-2,
                               block_diagonal=block, tol=1e-12)
        v = torch.randn(3, 51, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        want = torch.linalg.solve(exact.dense(), v.t()).t()
        got = cg.solve(v)
        assert (got - want).norm() / want.norm() < 1e-8
        assert cg.info.converged and 0 < cg.info.iterations <= 3 * 51
        assert float(cg.info.residual.max()) < 1e-10
    # through the scoring engine, with batches that do not divide 23
    cg = ConjugateGradient(model, task, loader(x, y, 10), damping=1e-2, tol=1e-12)
    exact = ExactInfluence.fit(model, task, loader(x, y, 10), damping=1e-2)
    want = pairwise_scores(model, task, exact, loader(x[:3], y[:3]), loader(x, y), progress=False)
    got = pairwise_scores(model, task, cg, loader(x[:3], y[:3]), loader(x, y), progress=False)
    torch.testing.assert_close(got.total, want.total, rtol=1e-8, atol=1e-10)


def test_lissa_converges_to_exact(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    exact = ExactInfluence.fit(model, task, loader(x, y, 23), damping=0.1)
    v = torch.randn(2, 51, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = torch.linalg.solve(exact.dense(), v.t()).t()
    full = LiSSA(model, task, loader(x, y), damping=0.1, depth=150)
    got = full.solve(v)  # full-batch: a truncated Neumann series, error (1 − αλ)^J
    assert (got - want).norm() / want.norm() < 1e-4
    assert full.info.scale * (torch.linalg.eigvalsh(exact.dense())[-1]) < 1.0
    sampled = LiSSA(model, task, loader(x, y), damping=0.1, depth=100, repeats=2,
                    batch_size=16, seed=0)
    got = sampled.solve(v)
    assert (got - want).norm() / want.norm() < 3e-2
    again = LiSSA(model, task, loader(x, y), damping=0.1, depth=100, repeats=2,
                  batch_size=16, seed=0).solve(v)
    torch.testing.assert_close(again, got, rtol=0, atol=0)  # seeded


def test_exact_hessian_matches_torch_func_hessian_and_handles_negative_curvature(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    layers = find_layers(model)
    names = [f"{la.name}.{k}" for la in layers for k in ("weight", "bias")]

    def mean_loss(theta):
        params, start = {}, 0
        for la in layers:
            p, m = la.grad_shape
            w = theta[start:start + p * m].reshape(p, m)
            params.update({f"{la.name}.weight": w[:, :-1], f"{la.name}.bias": w[:, -1]})
            start += p * m
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    theta = torch.cat([torch.cat([la.module.weight, la.module.bias[:, None]], 1).reshape(-1)
                       for la in layers]).detach()
    want = hessian(mean_loss)(theta)
    assert len(names) == 4 and float(torch.linalg.eigvalsh(want)[0]) < -1e-3  # indefinite
    with pytest.raises(DatasleuthError, match="not positive definite"):
        ExactInfluence.fit(model, task, loader(x, y, 8), kind="exact_hessian", damping=1e-4)
    clip = ExactInfluence.fit(model, task, loader(x, y, 8), kind="exact_hessian",
                              damping=1e-4, negative="clip")
    absval = ExactInfluence.fit(model, task, loader(x, y, 8), kind="exact_hessian",
                                damping=1e-4, negative="abs")
    evals, evecs = torch.linalg.eigh(want)
    torch.testing.assert_close(clip.matrix, (evecs * evals.clamp_min(0)) @ evecs.t())
    torch.testing.assert_close(absval.matrix, (evecs * evals.abs()) @ evecs.t())
    big = ExactInfluence.fit(model, task, loader(x, y, 8), kind="exact_hessian", damping=1.0)
    torch.testing.assert_close(big.matrix, want)


def test_self_influence_is_diagonal_of_pairwise_for_every_estimator(mlp_data):
    model, x, y = mlp_data
    x, y = x[:11], y[:11]
    task = ClassificationTask()
    estimators = [
        ExactInfluence.fit(model, task, loader(x, y), damping=0.05),
        ExactInfluence.fit(model, task, loader(x, y), kind="exact_hessian", damping=0.05,
                           negative="abs", block_diagonal=True),
        ConjugateGradient(model, task, loader(x, y, 11), damping=0.05, tol=1e-12),
        LiSSA(model, task, loader(x, y), damping=0.05, depth=50, batch_size=None),
    ]
    for est in estimators:
        pair = pairwise_scores(model, task, est, loader(x, y, 6), loader(x, y, 4),
                               progress=False)
        selfi = self_influence(model, task, est, loader(x, y, 5), progress=False)
        torch.testing.assert_close(selfi.total, torch.diagonal(pair.total), rtol=1e-7,
                                   atol=1e-10, msg=est.kind)
        torch.testing.assert_close(selfi.per_layer, torch.diagonal(pair.per_layer).t(),
                                   rtol=1e-7, atol=1e-10, msg=est.kind)
        assert bool((selfi.total > 0).all()), est.kind


def test_output_adapters_reproduce_the_task_loss_and_divergence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    lin = nn.Linear(4, 3).double()
    cases = [(ClassificationTask(), lin, (x, torch.tensor([0, 2, 1, 1, 0]))),
             (RegressionTask(), lin, (x, torch.randn(5, 3, generator=g, dtype=torch.float64)))]
    seqs = [[3, 5, 7, 2, 9], [4, 4, 1], [8, 2, 6, 6]]
    batch = lm_batch(seqs)
    batch["labels"][0, :2] = -100
    cases.append((CausalLMTask(), tiny_gpt2(vocab=11), batch))
    for task, model, b in cases:
        ad = output_adapter(task)
        out = ad.output(model, b)
        torch.testing.assert_close(ad.loss_from_output(out, b), task.loss(model, b))
        torch.testing.assert_close(ad.output_divergence(out, out, b),
                                   torch.zeros(3 if isinstance(task, CausalLMTask) else 5,
                                               dtype=torch.float64))
        assert bool((ad.output_divergence(out + torch.randn_like(out), out, b) > 0).all())

    class Custom(RegressionTask):
        def loss(self, model, batch):
            return super().loss(model, batch) * 2

    class Bare(Task):
        def loss(self, model, batch):
            return model(batch[0]).sum(1)

        def sampled_loss(self, model, batch, generator):
            return self.loss(model, batch)

    for task in (Custom(), Bare()):
        with pytest.raises(DatasleuthError, match="output_divergence"):
            output_adapter(task)


def test_output_methods_must_describe_the_loss_of_the_class_that_uses_them():
    """A task that redefines its loss below its output methods is refused; one whose
    loss and output both come from a redefined ``logits`` stays consistent."""
    model, batch = tiny_gpt2(vocab=11), lm_batch([[3, 5, 7, 2], [4, 1, 6]])

    class Scaled(CausalLMTask):
        def loss(self, model, batch):
            return 2 * super().loss(model, batch)

    class Sampled(CausalLMTask):
        def sampled_loss(self, model, batch, generator):
            return super().sampled_loss(model, batch, generator)

    class LossMixin:
        def loss(self, model, batch):
            return model(batch[0]).sum(1)

    class Mixed(LossMixin, ClassificationTask):
        pass

    for task, stale in ((Scaled(), "loss"), (Sampled(), "sampled_loss"), (Mixed(), "loss")):
        with pytest.raises(DatasleuthError, match=f"redefines {stale} below"):
            output_adapter(task)

    class Tempered(CausalLMTask):
        def logits(self, model, batch):
            return super().logits(model, batch) / 2

    class Fixed(Scaled):
        def loss_from_output(self, output, batch):
            return 2 * super().loss_from_output(output, batch)

        def output(self, model, batch):
            return super().output(model, batch)

        def output_divergence(self, output, reference, batch):
            return 2 * super().output_divergence(output, reference, batch)

    for task in (Tempered(), Fixed()):
        ad = output_adapter(task)
        assert ad is task
        torch.testing.assert_close(ad.loss_from_output(ad.output(model, batch), batch),
                                   task.loss(model, batch))


def test_engine_does_not_import_the_front_ends_and_exact_moves_its_factor(mlp_data):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import datasleuth

    src = str(Path(datasleuth.__file__).parents[1])  # this tree, not an installed copy
    code = ("import sys, datasleuth.estimators; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['datasleuth', 'lm'], ['datasleuth', 'cli'], ['datasleuth', 'demo'], "
            "['datasleuth', 'evaluation'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": src}).stdout
    assert out.strip() == "[]"
    model, x, y = mlp_data
    exact = ExactInfluence.fit(model, ClassificationTask(), loader(x, y), damping=0.05)
    moved = exact.to("cpu")
    assert moved._chol is exact._chol  # moved, not factored again
    v = torch.randn(3, 51, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moved.solve(v), torch.linalg.solve(exact.dense(), v.t()).t())


def test_exact_ggn_of_a_language_model_layer_matches_dense_oracle():
    """Conv1D layer of GPT-2, causal-LM adapter, padding and prompt masking, vs oracles."""
    model = tiny_gpt2(vocab=11)
    task = CausalLMTask()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 11, (int(n),), generator=g).tolist() for n in [6, 4, 7, 5]]
    train = [lm_batch(seqs[:3]), lm_batch(seqs[3:])]
    layers = find_layers(model, ["transformer.h.1.mlp.c_proj"])
    curv = fit_curvature(model, task, train, layers,
                         FitConfig(curvature="ekfac", fisher="empirical"), progress=False)
    exact = ExactInfluence.fit(model, task, train, damping="match", reference=curv)
    assert exact.layer_names == ["transformer.h.1.mlp.c_proj"]

    def output_fn(m, params, ex):
        kwargs = {k: ex[k] for k in ("input_ids", "attention_mask")}
        return functional_call(m, params, (), kwargs).logits[0]  # (T, V)

    def loss_fn(out, ex):
        return CausalLMTask._token_nll(out[None], ex["labels"]).sum()

    ggn = dense_ggn(model, layers[0], [lm_batch([s]) for s in seqs], output_fn, loss_fn)
    torch.testing.assert_close(exact.matrix, ggn, rtol=1e-9, atol=1e-12)
    query = lm_batch([seqs[1]])
    query["labels"][0, :2] = -100  # prompt = 2 tokens
    scores = pairwise_scores(model, task, exact, [query], train, progress=False).total
    assert int(scores[0].argmax()) == 1 and scores[0, 1] > 0
    cg = ConjugateGradient(model, task, train, damping="match", reference=curv, tol=1e-12)
    got = pairwise_scores(model, task, cg, [query], train, progress=False).total
    torch.testing.assert_close(got, scores, rtol=1e-7, atol=1e-10)


def test_estimator_input_errors(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    with pytest.raises(DatasleuthError, match="reference"):
        ExactInfluence.fit(model, task, loader(x, y), damping="match")
    with pytest.raises(DatasleuthError, match="unknown kind"):
        ExactInfluence.fit(model, task, loader(x, y), kind="dense")
    with pytest.raises(DatasleuthError, match="no value for layers"):
        ExactInfluence.fit(model, task, loader(x, y), damping={"0": 1.0})
    with pytest.raises(DatasleuthError, match="map-style dataset"):
        LiSSA(model, task, iter([(x, y)]))
    with pytest.raises(DatasleuthError, match="diverged"):
        LiSSA(model, task, loader(x, y), damping=0.1, depth=200, scale=100.0).solve(
            torch.ones(1, 51, dtype=torch.float64))
