"""Influence scores against dense damped Gauss-Newton influence and invariances."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import lm_batch, loader, tiny_gpt2
from oracles import dense_ggn, dense_influence, loop_gradients
from scipy.stats import pearsonr
from test_curvature import _exact_kfac_regression
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from datasleuth import (
    ClassificationTask,
    FitConfig,
    RegressionTask,
    find_layers,
    fit_curvature,
    pairwise_scores,
    self_influence,
    token_scores,
    top_k,
)
from datasleuth.lm.task import CausalLMTask
from datasleuth.scoring import precondition_queries


def _mlp_dense_scores(model, x, y, xq, yq, curv):
    task = ClassificationTask()
    layers = find_layers(model)
    ggn = {
        layer.name: dense_ggn(
            model, layer, [(x[i], y[i]) for i in range(len(x))],
            lambda m, params, ex: functional_call(m, params, (ex[0][None],))[0],
            lambda out, ex: F.cross_entropy(out[None], ex[1][None], reduction="sum"),
        )
        for layer in layers
    }
    one = [(xq[i : i + 1], yq[i : i + 1]) for i in range(len(xq))]
    qg = loop_gradients(model, layers, one, lambda m, ex: task.measurement(m, ex).sum())
    tg = loop_gradients(model, layers, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))],
                        lambda m, ex: task.loss(m, ex).sum())
    damping = {n: lc.damping for n, lc in curv.layers.items()}
    return dense_influence(qg, tg, ggn, damping), ggn


def test_ekfac_equals_dense_gn_influence_where_kfac_is_exact():
    model, x, xs, ys = _exact_kfac_regression()
    data = DataLoader(TensorDataset(xs, ys), batch_size=4)
    task = RegressionTask()
    layer = find_layers(model)[0]
    queries = [(xs[:3], ys[:3])]
    xbar = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    ggn = torch.kron(torch.eye(2, dtype=torch.float64), xbar.t() @ xbar / len(x))
    qg = loop_gradients(model, [layer], [(xs[i : i + 1], ys[i : i + 1]) for i in range(3)],
                        lambda m, ex: task.measurement(m, ex).sum())
    tg = loop_gradients(model, [layer], [(xs[i : i + 1], ys[i : i + 1]) for i in range(len(xs))],
                        lambda m, ex: task.loss(m, ex).sum())
    for kind in ("kfac", "ekfac"):
        curv = fit_curvature(model, task, data, None,
                             FitConfig(curvature=kind, fisher="empirical", damping=0.01),
                             progress=False)
        got = pairwise_scores(model, task, curv, queries, data, progress=False)
        want = dense_influence(qg, tg, {layer.name: ggn}, {layer.name: 0.01})
        torch.testing.assert_close(got.total, want, rtol=1e-8, atol=1e-10)


def test_ekfac_tracks_dense_gn_influence_on_mlp(mlp_data):
    """EK-FAC with the true (sampled) Fisher against the exact per-layer damped GGN."""
    model, x, y = mlp_data
    task = ClassificationTask()
    repeated = [b for _ in range(40) for b in loader(x, y, 23)]  # many label samples
    curv = fit_curvature(model, task, repeated, None, FitConfig(curvature="ekfac"),
                         progress=False)
    got = pairwise_scores(model, task, curv, loader(x[:5], y[:5]), loader(x, y), progress=False)
    want, ggn = _mlp_dense_scores(model, x, y, x[:5], y[:5], curv)
    r = pearsonr(got.total.reshape(-1).numpy(), want.reshape(-1).numpy())[0]
    assert r > 0.95, r
    ident = fit_curvature(model, task, loader(x, y), None, FitConfig(curvature="identity"),
                          progress=False)
    dot = pairwise_scores(model, task, ident, loader(x[:5], y[:5]), loader(x, y), progress=False)
    r_dot = pearsonr(dot.total.reshape(-1).numpy(), want.reshape(-1).numpy())[0]
    assert r > r_dot


def test_per_layer_scores_sum_and_match_dense_per_layer(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    curv = fit_curvature(model, task, loader(x, y), None,
                         FitConfig(curvature="diagonal", fisher="empirical"), progress=False)
    got = pairwise_scores(model, task, curv, loader(x[:3], y[:3]), loader(x, y), progress=False)
    torch.testing.assert_close(got.per_layer.sum(-1), got.total)
    layers = find_layers(model)
    qg = loop_gradients(model, layers, [(x[i : i + 1], y[i : i + 1]) for i in range(3)],
                        lambda m, ex: task.measurement(m, ex).sum())
    tg = loop_gradients(model, layers, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))],
                        lambda m, ex: task.loss(m, ex).sum())
    for li, layer in enumerate(layers):
        lc = curv.layers[layer.name]
        diag = torch.diag(lc.eigenvalues.reshape(-1))  # the diagonal Fisher, densely
        want = dense_influence(qg, tg, {layer.name: diag}, {layer.name: lc.damping})
        torch.testing.assert_close(got.per_layer[..., li], want)


def test_self_influence_is_diagonal_of_pairwise(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    curv = fit_curvature(model, task, loader(x, y), None, FitConfig(blocks=2), progress=False)
    pair = pairwise_scores(model, task, curv, loader(x, y, 6), loader(x, y, 4), progress=False)
    selfi = self_influence(model, task, curv, loader(x, y, 7), progress=False)
    torch.testing.assert_close(selfi.total, torch.diagonal(pair.total))
    torch.testing.assert_close(selfi.per_layer, torch.diagonal(pair.per_layer).t())
    assert bool((selfi.total > 0).all())
    with torch.no_grad():  # the training loss of each example comes from the same pass
        torch.testing.assert_close(selfi.loss, F.cross_entropy(model(x), y, reduction="none"))


def test_scores_do_not_depend_on_batch_size_or_order(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    curv = fit_curvature(model, task, loader(x, y), None, progress=False)
    ref = pairwise_scores(model, task, curv, loader(x[:4], y[:4], 4), loader(x, y, 23),
                          progress=False).total
    for bs in (1, 5, 10):
        got = pairwise_scores(model, task, curv, loader(x[:4], y[:4], 3), loader(x, y, bs),
                              progress=False).total
        torch.testing.assert_close(got, ref)
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(5))
    got = pairwise_scores(model, task, curv, loader(x[:4], y[:4]), loader(x, y, 6, 5),
                          progress=False).total
    torch.testing.assert_close(got, ref[:, perm])


def test_identical_training_example_ranks_first_and_positive(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    for kind in ("identity", "diagonal", "kfac", "ekfac"):
        curv = fit_curvature(model, task, loader(x, y), None, FitConfig(curvature=kind),
                             progress=False)
        scores = pairwise_scores(model, task, curv, loader(x, y), loader(x, y), progress=False)
        first, s1 = top_k(scores.total, 1)[3][0]
        assert first == 3 and s1 > 0, kind
        assert bool((torch.diagonal(scores.total) > 0).all()), kind


def test_lm_identical_sequence_ranks_first_and_token_scores_sum():
    model = tiny_gpt2(vocab=13)
    task = CausalLMTask()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 13, (int(n),), generator=g).tolist() for n in [7, 5, 8, 6, 7, 4]]
    train = [lm_batch(seqs[:4]), lm_batch(seqs[4:])]
    layers = find_layers(model, ["*.mlp.*"])
    curv = fit_curvature(model, task, train, layers, progress=False)
    query = lm_batch([seqs[2]])
    query["labels"][0, :3] = -100  # prompt = first 3 tokens, completion = the rest
    scores = pairwise_scores(model, task, curv, [query], train, progress=False)
    assert top_k(scores.total, 1)[0][0][0] == 2 and scores.total[0, 2] > 0
    pre = precondition_queries(model, task, curv, [query])
    tok = token_scores(model, task, pre, train[0])  # (B, Q, T, L)
    torch.testing.assert_close(tok.sum((2, 3)), scores.total[:, :4].t())
    torch.testing.assert_close(tok.sum(2)[:, 0], scores.per_layer[0, :4])
    assert bool((tok[1, 0, 5:] == 0).all())  # padding carries no influence
