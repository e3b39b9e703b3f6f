"""Per-example layer gradients from hooks equal one backward pass per example."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, tiny_gpt2
from oracles import loop_gradients
from torch import nn

from datasleuth import ClassificationTask, DatasleuthError, find_layers
from datasleuth.lm.task import CausalLMTask
from datasleuth.scoring import collect_gradients


def test_mlp_per_example_gradients_match_loop(mlp_data):
    model, x, y = mlp_data
    layers = find_layers(model)
    task = ClassificationTask()
    batches = [(x[i : i + 7], y[i : i + 7]) for i in range(0, len(x), 7)]
    got = collect_gradients(model, task, batches, layers, objective="loglik")
    want = loop_gradients(model, layers, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))],
                          lambda m, ex: -task.loss(m, ex).sum())
    for layer in layers:
        assert got[layer.name].shape == (len(x), *layer.grad_shape)
        torch.testing.assert_close(got[layer.name], want[layer.name], rtol=1e-10, atol=1e-12)


def test_gpt2_conv1d_gradients_with_padding_match_loop():
    model = tiny_gpt2()
    layers = find_layers(model, include=["*.mlp.*", "*.attn.c_attn"])
    assert {layer.kind for layer in layers} == {"conv1d"}
    seqs = [[1, 2, 3, 4, 5, 6], [7, 3, 2], [4, 4, 9, 10, 1]]
    task = CausalLMTask()
    got = collect_gradients(model, task, [lm_batch(seqs)], layers, objective="loglik")
    want = loop_gradients(model, layers, [lm_batch([s]) for s in seqs],
                          lambda m, ex: -task.loss(m, ex).sum())
    for layer in layers:
        torch.testing.assert_close(got[layer.name], want[layer.name], rtol=1e-9, atol=1e-11)


def test_layers_without_bias_and_weights_restored(mlp_data):
    _, x, y = mlp_data
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 3)).double()
    model[2].weight.requires_grad_(False)  # a frozen layer can still be tracked
    layers = find_layers(model)
    assert layers[0].grad_shape == (5, 4) and layers[1].grad_shape == (3, 6)
    task = ClassificationTask()
    got = collect_gradients(model, task, [(x, y)], layers, objective="loglik")
    model[2].weight.requires_grad_(True)
    want = loop_gradients(model, layers, [(x[i : i + 1], y[i : i + 1]) for i in range(len(x))],
                          lambda m, ex: -task.loss(m, ex).sum())
    torch.testing.assert_close(got["0"], want["0"])
    torch.testing.assert_close(got["2"], want["2"])


def test_requires_grad_flags_restored_after_capture(mlp_data):
    model, x, y = mlp_data
    model[0].bias.requires_grad_(False)
    collect_gradients(model, ClassificationTask(), [(x, y)], find_layers(model, ["2"]), "loglik")
    assert model[0].bias.requires_grad is False and model[0].weight.requires_grad is True
    assert model[2].weight.grad is None  # no weight gradient was ever computed


def test_layer_patterns_select_and_fail_clearly(mlp_data):
    model, _, _ = mlp_data
    assert [layer.name for layer in find_layers(model, include=["2"])] == ["2"]
    assert [layer.name for layer in find_layers(model, exclude=["0"])] == ["2"]
    with pytest.raises(DatasleuthError, match="choose patterns"):
        find_layers(model, include=["*.mlp.*"])


def test_distinct_modules_sharing_a_weight_are_tracked_with_a_warning():
    """Tied weights (Zamba's shared block): separate layers, and the user is told."""
    import warnings

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Linear(3, 2))
    model[2].weight = model[0].weight
    with pytest.warns(UserWarning, match=r"share weights \(0 = 2\)"):
        layers = find_layers(model)
    assert [ly.name for ly in layers] == ["0", "2", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        find_layers(model, include=["0", "3"])


def test_a_tracked_layer_no_gradient_reaches_scores_zero_with_a_warning():
    """A layer that never runs (a vision tower on text) has DW̄ = 0: zeros are reported
    for it in every batch, so the other layers' results are unchanged, and the user is
    told instead of meeting a KeyError or a silent zero."""
    from datasleuth import ClassificationTask, FitConfig, fit_curvature, pairwise_scores

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused, self.b = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = WithUnused().double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    data, task = [(x[:4], y[:4]), (x[4:], y[4:])], ClassificationTask()
    with pytest.warns(UserWarning, match="no gradient reached tracked layers 'unused'"):
        curv = fit_curvature(model, task, data, None, FitConfig(), progress=False)
    with pytest.warns(UserWarning, match="'unused'"):
        got = pairwise_scores(model, task, curv, [data[0]], data, progress=False)
    ref = fit_curvature(model, task, data, ["a", "b"], FitConfig(), progress=False)
    want = pairwise_scores(model, task, ref, [data[0]], data, progress=False)
    assert got.layer_names == ["a", "unused", "b"]
    assert torch.equal(got.per_layer[..., 1], torch.zeros_like(got.per_layer[..., 1]))
    torch.testing.assert_close(got.per_layer[..., [0, 2]], want.per_layer, rtol=1e-12,
                               atol=1e-12)
