"""Curvature factors and eigenvalues equal their dense definitions (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_batch, loader, tiny_gpt2
from oracles import dense_ggn, loop_gradients
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from datasleuth import (
    ClassificationTask,
    DatasleuthError,
    FitConfig,
    RegressionTask,
    find_layers,
    fit_curvature,
)
from datasleuth.layers import capture
from datasleuth.lm.task import CausalLMTask


def _dense_factors(model, layer, batches, task):
    """A = Σ ā āᵀ / tokens, S = Σ Ds Dsᵀ / tokens over unmasked tokens, by direct capture."""
    rows_a, rows_g = [], []

    def keep(lay, a, g):
        rows_a.append(a.reshape(-1, a.shape[-1]))
        rows_g.append(g.reshape(-1, g.shape[-1]))

    with capture(model, [layer], keep, dtype=torch.float64) as state:
        for b in batches:
            m = task.mask(b)
            state.set_batch(m)
            torch.autograd.grad(task.loss(model, b).sum(), state.outputs)
    a, g = torch.cat(rows_a), torch.cat(rows_g)
    real = a[:, -1] > 0  # bias column of ā is the mask
    a, g = a[real], g[real]
    return a.t() @ a / len(a), g.t() @ g / len(a), len(a)


def test_kfac_factors_equal_definition_on_padded_lm():
    model = tiny_gpt2()
    seqs = [[1, 2, 3, 4, 5, 6], [7, 3, 2], [4, 4, 9, 10, 1], [2, 2]]
    batches = [lm_batch(seqs[:3]), lm_batch(seqs[3:])]
    task = CausalLMTask()
    layer = find_layers(model, ["transformer.h.1.mlp.c_fc"])[0]
    curv = fit_curvature(model, task, batches, [layer],
                         FitConfig(curvature="kfac", fisher="empirical"), progress=False)
    a, s, tokens = _dense_factors(model, layer, batches, task)
    assert tokens == 16 and curv.metadata["tokens"] == 16
    lc = curv.layers[layer.name]
    torch.testing.assert_close(lc.factor("in"), a, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lc.factor("out"), s, rtol=1e-9, atol=1e-12)
    mean_tokens = 16 / 4
    torch.testing.assert_close(
        lc.eigenvalues, mean_tokens * torch.outer(lc.s_eigenvalues, lc.a_eigenvalues)
    )


def _exact_kfac_regression():
    """Linear model, squared loss, residuals ±√P e_j for every input: S = I for every x,
    so the output-gradient statistics do not depend on the input and K-FAC is exact."""
    g = torch.Generator().manual_seed(1)
    m, p, n = 3, 2, 7
    model = nn.Linear(m, p).double()
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    xs, ys = [], []
    for i in range(n):
        for j in range(p):
            for sign in (1.0, -1.0):
                r = torch.zeros(p, dtype=torch.float64)
                r[j] = sign * p**0.5
                xs.append(x[i])
                ys.append(out[i] - r)  # residual out - y = r
    return model, x, torch.stack(xs), torch.stack(ys)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kfac_inverse_equals_dense_ggn_inverse_where_exact(kind):
    model, x, xs, ys = _exact_kfac_regression()
    data = DataLoader(TensorDataset(xs, ys), batch_size=5)
    curv = fit_curvature(model, RegressionTask(), data, None,
                         FitConfig(curvature=kind, fisher="empirical", damping=0.05),
                         progress=False)
    lc = curv.layers[""] if "" in curv.layers else next(iter(curv.layers.values()))
    xbar = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    ggn = torch.kron(torch.eye(2, dtype=torch.float64), xbar.t() @ xbar / len(x))  # I_P ⊗ E[x̄x̄ᵀ]
    damped = ggn + 0.05 * torch.eye(ggn.shape[0], dtype=torch.float64)
    torch.testing.assert_close(lc.dense(), damped, rtol=1e-9, atol=1e-12)
    v = torch.randn(3, 2, 4, dtype=torch.float64)
    want = (torch.linalg.inv(damped) @ v.reshape(3, -1).t()).t().reshape(3, 2, 4)
    torch.testing.assert_close(lc.precondition(v), want, rtol=1e-9, atol=1e-12)


def test_ekfac_eigenvalues_equal_dense_gn_diagonal_in_kronecker_basis(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    curv = fit_curvature(model, task, loader(x, y, 4), None,
                         FitConfig(curvature="ekfac", fisher="empirical"), progress=False)
    layers = find_layers(model)
    grads = loop_gradients(model, layers, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))],
                           lambda m, ex: task.loss(m, ex).sum())
    for layer in layers:
        lc = curv.layers[layer.name]
        d = grads[layer.name].reshape(len(x), -1)
        gn = d.t() @ d / len(x)  # dense per-layer GN from the same pseudo-gradients
        q = torch.kron(lc.q_out.dense(), lc.q_in.dense())
        torch.testing.assert_close(lc.eigenvalues.reshape(-1), torch.diagonal(q.t() @ gn @ q),
                                   rtol=1e-9, atol=1e-14)
        assert lc.damping == pytest.approx(0.1 * float(lc.eigenvalues.mean()))


def test_diagonal_is_mean_squared_gradient(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    curv = fit_curvature(model, task, loader(x, y, 6), None,
                         FitConfig(curvature="diagonal", fisher="empirical"), progress=False)
    layers = find_layers(model)
    grads = loop_gradients(model, layers, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))],
                           lambda m, ex: task.loss(m, ex).sum())
    for layer in layers:
        torch.testing.assert_close(curv.layers[layer.name].eigenvalues,
                                   grads[layer.name].square().mean(0))


def test_block_diagonal_factors_are_the_diagonal_blocks(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    cfg = dict(curvature="ekfac", fisher="empirical")
    full = fit_curvature(model, task, loader(x, y), None, FitConfig(**cfg), progress=False)
    split = fit_curvature(model, task, loader(x, y), None, FitConfig(**cfg, blocks=2),
                          progress=False)
    a_full = full.layers["0"].factor("in")
    a_split = split.layers["0"].factor("in")  # (5, 5): blocks of sizes 2 and 3 (sic: 4 + bias)
    assert len(split.layers["0"].q_in.blocks) == 2
    mask = torch.block_diag(*[torch.ones(e - s, e - s) for s, e in
                              split.layers["0"].q_in.bounds]).bool()
    torch.testing.assert_close(a_split, torch.where(mask, a_full, torch.zeros_like(a_full)))
    # the preconditioner still inverts its own (block-Kronecker-basis) damped matrix
    lc = split.layers["2"]
    v = torch.randn(2, 3, 7, dtype=torch.float64)
    want = (torch.linalg.inv(lc.dense()) @ v.reshape(2, -1).t()).t().reshape(2, 3, 7)
    torch.testing.assert_close(lc.precondition(v), want)


def test_factors_do_not_depend_on_batch_size_or_order(mlp_data):
    model, x, y = mlp_data
    task = ClassificationTask()
    cfg = FitConfig(curvature="ekfac", fisher="empirical")
    ref = fit_curvature(model, task, loader(x, y, 23), None, cfg, progress=False)
    for bs, seed in [(1, None), (4, 3), (10, 7)]:
        other = fit_curvature(model, task, loader(x, y, bs, seed), None, cfg, progress=False)
        for name, lc in ref.layers.items():
            torch.testing.assert_close(other.layers[name].factor("in"), lc.factor("in"))
            torch.testing.assert_close(other.layers[name].eigenvalues, lc.eigenvalues)


def test_sampled_fisher_is_seeded_and_its_mean_is_the_gauss_newton_diagonal(mlp_data):
    """Labels drawn from the model make the Fisher an unbiased estimate of the GGN (§3)."""
    model, x, y = mlp_data
    task = ClassificationTask()
    a = fit_curvature(model, task, loader(x, y), None, FitConfig(seed=3), progress=False)
    b = fit_curvature(model, task, loader(x, y), None, FitConfig(seed=3), progress=False)
    c = fit_curvature(model, task, loader(x, y), None, FitConfig(seed=4), progress=False)
    torch.testing.assert_close(a.layers["2"].eigenvalues, b.layers["2"].eigenvalues)
    assert not torch.allclose(a.layers["2"].eigenvalues, c.layers["2"].eigenvalues)

    # E_ŷ[(∂ log p(ŷ|x)/∂θ)²] = diag(Jᵀ (diag p − ppᵀ) J): the diagonal GGN, exactly.
    draws = torch.stack([torch.cat([lc.eigenvalues.reshape(-1) for lc in fit_curvature(
        model, task, loader(x, y), None, FitConfig(curvature="diagonal", seed=s),
        progress=False).layers.values()]) for s in range(150)])  # (seeds, D)
    layers = find_layers(model)
    exact = torch.cat([torch.diagonal(dense_ggn(
        model, layer, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))],
        lambda m, params, ex: functional_call(m, params, (ex[0],)),
        lambda out, ex: F.cross_entropy(out, ex[1], reduction="sum"))) for layer in layers])
    mean, error = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    assert bool(((mean - exact).abs() <= 4 * error + 1e-12).all())
    assert float((mean - exact).norm() / exact.norm()) < 0.05
    empirical = fit_curvature(model, task, loader(x, y), None,
                              FitConfig(curvature="diagonal", fisher="empirical"),
                              progress=False)  # the data's labels: a different matrix
    emp = torch.cat([lc.eigenvalues.reshape(-1) for lc in empirical.layers.values()])
    assert float((emp - exact).norm() / exact.norm()) > 0.1


def test_config_is_validated():
    with pytest.raises(DatasleuthError, match="choose one of"):
        FitConfig(curvature="kfca")
    with pytest.raises(DatasleuthError, match="damping"):
        FitConfig(damping=-1.0)
    with pytest.raises(DatasleuthError, match="fisher"):
        FitConfig(fisher="true")
    with pytest.raises(DatasleuthError, match="blocks"):
        FitConfig(blocks=0)


class _DiesAfter:
    """A loader that raises KeyboardInterrupt when its ``limit``-th batch is requested."""

    def __init__(self, batches, limit):
        self.batches, self.limit, self.count = batches, limit, 0

    def __iter__(self):
        for b in self.batches:
            if self.count == self.limit:
                raise KeyboardInterrupt
            self.count += 1
            yield b


@pytest.mark.parametrize("kind", ["ekfac", "kfac", "diagonal"])
@pytest.mark.parametrize("kill_at", [2, 7])
def test_killed_fit_resumes_to_the_uninterrupted_result(mlp_data, tmp_path, kind, kill_at):
    model, x, y = mlp_data
    batches = list(loader(x, y, batch_size=5))  # 5 batches a pass
    cfg = FitConfig(curvature=kind)  # sampled labels: the sampler's state must resume too
    want = fit_curvature(model, ClassificationTask(), batches, None, cfg, progress=False)
    ckpt = tmp_path / "fit.safetensors"
    passes = 2 if kind == "ekfac" else 1
    if kill_at < 5 * passes:
        with pytest.raises(KeyboardInterrupt):
            fit_curvature(model, ClassificationTask(), _DiesAfter(batches, kill_at), None, cfg,
                          progress=False, checkpoint=ckpt, checkpoint_seconds=0)
        assert ckpt.is_file()
    counting = _DiesAfter(batches, 10**6)
    got = fit_curvature(model, ClassificationTask(), counting, None, cfg, progress=False,
                        checkpoint=ckpt, checkpoint_seconds=0)
    assert not ckpt.exists()
    for name, layer in want.layers.items():
        torch.testing.assert_close(got.layers[name].dense(), layer.dense(), rtol=1e-12,
                                   atol=1e-14)
    assert got.metadata["sequences"] == want.metadata["sequences"] == 23
    # A snapshot of another configuration is ignored, not misused.
    with pytest.raises(KeyboardInterrupt):
        fit_curvature(model, ClassificationTask(), _DiesAfter(batches, 3), None, cfg,
                      progress=False, checkpoint=ckpt, checkpoint_seconds=0)
    other = fit_curvature(model, ClassificationTask(), batches, None,
                          FitConfig(curvature=kind, seed=1), progress=False, checkpoint=ckpt)
    fresh = fit_curvature(model, ClassificationTask(), batches, None, FitConfig(curvature=kind,
                          seed=1), progress=False)
    for name, layer in fresh.layers.items():
        torch.testing.assert_close(other.layers[name].dense(), layer.dense(), rtol=1e-12,
                                   atol=1e-14)
