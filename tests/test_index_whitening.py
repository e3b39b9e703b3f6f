"""Whitened (metric-preserving) index rows and projection sizes (docs/method.md §11)."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, tiny_gpt2
from oracles import loop_gradients

from datasleuth import DatasleuthError, FitConfig, find_layers, fit_curvature
from datasleuth.curvature import Basis, LayerCurvature
from datasleuth.lm.task import CausalLMTask
from datasleuth.scale.index import (
    GradientIndex,
    IndexConfig,
    auto_dims,
    build_index,
    effective_dimension,
    fit_projected_curvature,
    kron_root,
)
from datasleuth.scoring import precondition_queries

MLP = ["*.mlp.*"]


def _sequences(n: int, vocab: int = 13, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    return [torch.randint(1, vocab, (int(t),), generator=g).tolist() for t in lengths]


def _query(seq: list[int], prompt: int) -> dict:
    q = lm_batch([seq])
    q["labels"][0, :prompt] = -100
    return q


@pytest.fixture(scope="module")
def fitted():
    model, task = tiny_gpt2(vocab=13), CausalLMTask()
    seqs = _sequences(12)
    batches = [lm_batch(seqs[i : i + 4]) for i in range(0, len(seqs), 4)]
    curv = fit_curvature(model, task, batches, MLP, FitConfig(fisher="empirical"),
                         progress=False)
    return model, task, seqs, curv


def _ekfac_scores(model, task, curv, queries, seqs):
    """Full EK-FAC influence of each sequence on each query, from for-loop gradients."""
    layers = find_layers(model, MLP)
    train = loop_gradients(model, layers, [lm_batch([s]) for s in seqs],
                           lambda m, b: -task.loss(m, b).sum())
    pre = precondition_queries(model, task, curv, queries)  # {layer: (Q, P, M+1)}
    return sum(pre[n].flatten(1) @ train[n].flatten(1).t() for n in pre)  # (Q, N)


def _build(model, task, seqs, curv, path, **cfg):
    config = IndexConfig(dtype="float64", shard_size=5, **cfg)
    return build_index(model, task, seqs, MLP, path, config, batch_size=3,
                       collate_fn=lm_batch, progress=False, curvature=curv)


def test_ekfac_whitened_identity_rows_equal_full_ekfac_scores(fitted, tmp_path):
    """Projection size = layer size: row inner products are the EK-FAC influence, exactly."""
    model, task, seqs, curv = fitted
    index = _build(model, task, seqs, curv, tmp_path, k_in=None, k_out=None,
                   projection="identity", whitening="ekfac")
    rows = index.load_rows()
    layers = find_layers(model, MLP)
    train = loop_gradients(model, layers, [lm_batch([s]) for s in seqs],
                           lambda m, b: -task.loss(m, b).sum())
    pre = curv.precondition(train)  # train-train influence, (N, N)
    want = sum(pre[n].flatten(1) @ train[n].flatten(1).t() for n in pre)
    torch.testing.assert_close(rows @ rows.t(), want, rtol=1e-9, atol=1e-12)

    queries = [_query(seqs[2], 3), _query(_sequences(1, seed=9)[0], 2)]
    reopened = GradientIndex.open(tmp_path, model, MLP)
    q = precondition_queries(model, task, reopened.curvature, queries,
                             features=reopened.features)  # no query-side curvature
    got = reopened.scores(q)
    torch.testing.assert_close(got, _ekfac_scores(model, task, curv, queries, seqs),
                               rtol=1e-9, atol=1e-12)
    assert reopened.manifest["whitening"]["kind"] == "ekfac"
    sizes = reopened.manifest["sizes"]
    for layer in find_layers(model, MLP):
        assert sizes[layer.name]["effective_dimension"] == pytest.approx(
            effective_dimension(curv.layers[layer.name]), abs=1e-3)
        assert sizes[layer.name]["dim"] == layer.grad_shape[0] * layer.grad_shape[1]


def test_kron_root_is_exact_for_kronecker_eigenvalues():
    """With Λ + λ = s aᵀ (a Kronecker product), W_S ⊗ W_A squared is (G + λI)⁻¹."""
    g = torch.Generator().manual_seed(0)
    qs, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    qa, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    s = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    a = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    layer = LayerCurvature(torch.outer(s, a) - 0.1, 0.1, Basis([qs]), Basis([qa]))
    w_s, w_a = kron_root(layer)
    w = torch.kron(w_s, w_a)
    torch.testing.assert_close(w @ w, torch.linalg.inv(layer.dense()), rtol=1e-10, atol=1e-12)


def test_kron_whitened_rows_use_the_kronecker_root(fitted, tmp_path):
    """Identity-size kron rows: inner products are gᵀ (W_S² ⊗ W_A²) g' of dense gradients."""
    model, task, seqs, curv = fitted
    index = _build(model, task, seqs, curv, tmp_path, k_in=None, k_out=None,
                   projection="identity", whitening="kron")
    layers = find_layers(model, MLP)
    train = loop_gradients(model, layers, [lm_batch([s]) for s in seqs],
                           lambda m, b: -task.loss(m, b).sum())
    want = 0
    for name, gr in train.items():
        w_s, w_a = kron_root(curv.layers[name])
        white = w_s @ gr @ w_a  # W_S V W_Aᵀ (both symmetric)
        want = want + white.flatten(1) @ white.flatten(1).t()
    rows = index.load_rows()
    torch.testing.assert_close(rows @ rows.t(), want, rtol=1e-9, atol=1e-12)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("whitening", ["ekfac", "kron"])
def test_agreement_rises_with_projection_size(fitted, tmp_path, whitening):
    """Mean Pearson (over seeds) with full EK-FAC train-train scores rises with k."""
    model, task, seqs, curv = fitted
    layers = find_layers(model, MLP)
    train = loop_gradients(model, layers, [lm_batch([s]) for s in seqs],
                           lambda m, b: -task.loss(m, b).sum())
    pre = curv.precondition(train)
    ref = sum(pre[n].flatten(1) @ train[n].flatten(1).t() for n in pre)
    off = ~torch.eye(len(seqs), dtype=torch.bool)
    means = []
    for k in (2, 4, 8, 32):
        rs = []
        for seed in range(8):
            index = _build(model, task, seqs, curv, tmp_path / f"{k}-{seed}", k_in=k, k_out=k,
                           seed=seed, whitening=whitening)
            rows = index.load_rows()
            rs.append(_pearson((rows @ rows.t())[off], ref[off]))
        means.append(sum(rs) / len(rs))
    assert all(b > a for a, b in zip(means, means[1:])), means
    assert means[-1] > 0.6, means


def test_effective_dimension_and_auto_sizes(fitted):
    model, task, seqs, curv = fitted
    layers = find_layers(model, MLP)
    for layer in layers:
        c = curv.layers[layer.name]
        dense = c.dense()  # G + λI
        g = dense - c.damping * torch.eye(dense.shape[0], dtype=torch.float64)
        want = float(torch.trace(g @ torch.linalg.inv(dense)))
        assert effective_dimension(c) == pytest.approx(want, rel=1e-8)
    k_out, k_in, report = auto_dims(layers, curv, 200, dtype="float16")
    dims = [k_out[ly.name] * k_in[ly.name] for ly in layers]
    assert sum(dims) * 2 <= 200
    for ly in layers:
        r = report[ly.name]
        assert r["dim"] <= r["theory_dim"] and k_out[ly.name] <= ly.grad_shape[0]
        assert k_in[ly.name] <= ly.grad_shape[1]
    big_out, big_in, _ = auto_dims(layers, curv, 10**9, dtype="float16")
    for ly in layers:  # a large budget stops at the theory's size
        assert big_out[ly.name] * big_in[ly.name] <= report[ly.name]["theory_dim"]
    with pytest.raises(DatasleuthError, match="bytes per sequence"):
        auto_dims(layers, curv, 3)


def test_whitened_index_needs_its_curvature(fitted, tmp_path):
    model, task, seqs, curv = fitted
    with pytest.raises(DatasleuthError, match="needs the fitted curvature"):
        build_index(model, task, seqs, MLP, tmp_path / "a", IndexConfig(whitening="ekfac"),
                    collate_fn=lm_batch, progress=False)
    index = _build(model, task, seqs[:6], curv, tmp_path / "b", whitening="ekfac", k_in=2,
                   k_out=2)
    with pytest.raises(DatasleuthError, match="no projected curvature"):
        fit_projected_curvature(model, task, [lm_batch(seqs)], index, progress=False)
    other = fit_curvature(model, task, [lm_batch(seqs[:5])], MLP,
                          FitConfig(fisher="empirical"), progress=False)
    with pytest.raises(DatasleuthError, match="another fitted curvature"):
        build_index(model, task, seqs[6:], MLP, tmp_path / "b", index.config, batch_size=3,
                    collate_fn=lm_batch, progress=False, curvature=other, append=True)


def test_eigen_selection_keeps_the_highest_energy_ekfac_coordinates(fitted, tmp_path):
    """projection='eigen': rows are the whitened eigen-coordinates of largest Λ/(Λ+λ)."""
    model, task, seqs, curv = fitted
    index = _build(model, task, seqs, curv, tmp_path, k_in=3, k_out=4, projection="eigen",
                   whitening="ekfac")
    assert index.dim == 12 * 4
    layers = find_layers(model, MLP)
    train = loop_gradients(model, layers, [lm_batch([s]) for s in seqs],
                           lambda m, b: -task.loss(m, b).sum())
    want = 0
    for name, gr in train.items():
        c = curv.layers[name]
        sigma = c.eigenvalues.double().reshape(-1)
        keep = torch.argsort(sigma, descending=True)[:12]  # Λ/(Λ+λ) is monotone in Λ
        coords = c.rotate(gr).reshape(len(seqs), -1)[:, keep]
        want = want + (coords / (sigma[keep] + c.damping)) @ coords.t()
    rows = GradientIndex.open(tmp_path).load_rows()
    torch.testing.assert_close(rows @ rows.t(), want, rtol=1e-9, atol=1e-12)
    with pytest.raises(DatasleuthError, match="whitening='ekfac'"):
        IndexConfig(projection="eigen", whitening="kron")


def test_auto_sizes_for_eigen_selection_follow_the_global_energy(fitted):
    """projection='eigen': the budget goes to the highest Λ/(Λ+λ) of all layers together."""
    model, task, seqs, curv = fitted
    layers = find_layers(model, MLP)
    k_out, k_in, report = auto_dims(layers, curv, 2 * 100, dtype="float16",
                                    projection="eigen")
    energy = {ly.name: (lambda c: (c.eigenvalues / (c.eigenvalues + c.damping)).reshape(-1))(
        curv.layers[ly.name]) for ly in layers}
    cut = torch.cat(list(energy.values())).sort(descending=True).values[99]
    for ly in layers:
        count = int((energy[ly.name] >= cut).sum())
        assert k_out[ly.name] * k_in[ly.name] <= count
        assert count - k_out[ly.name] * k_in[ly.name] < k_in[ly.name]
    assert sum(r["dim"] for r in report.values()) <= 100
