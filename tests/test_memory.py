"""Memory estimates equal what is allocated; --max-factor-memory splits factors into blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, tiny_gpt2

from datasleuth import DatasleuthError, FitConfig, find_layers, fit_curvature
from datasleuth.fitting import _Stats
from datasleuth.lm.task import CausalLMTask
from datasleuth.memory import blocks_for_budget, estimate_memory, factor_bytes
from datasleuth.scale.batching import LowRankQueries


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_factor_bytes_equal_the_fit_sums(blocks):
    layer = find_layers(tiny_gpt2(), ["transformer.h.0.mlp.c_fc"])[0]  # (32, 9)
    s = _Stats(layer, blocks)
    assert factor_bytes(layer.grad_shape, blocks) == _bytes(s.a_cov + s.s_cov + [s.lam])
    assert factor_bytes(layer.grad_shape, blocks, kronecker=False) == _bytes([s.lam])


def test_budget_splits_only_the_layers_over_it_and_equals_explicit_blocks():
    model = tiny_gpt2()
    layers = find_layers(model, ["transformer.h.0.mlp.*"])  # c_fc (32, 9), c_proj (8, 33)
    task = CausalLMTask()
    batches = [lm_batch([[1, 2, 3, 4, 5, 6], [7, 3, 2]]), lm_batch([[4, 4, 9, 10, 1]])]
    budget = factor_bytes((32, 9), 1) - 1  # c_fc just over it; c_proj (8 x 33) far over it
    need = [next(b for b in range(1, 40) if factor_bytes(x.grad_shape, b) <= budget)
            for x in layers]
    assert need == [2, 2] and factor_bytes((8, 33), 1) > factor_bytes((32, 9), 1)
    assert [blocks_for_budget(x.grad_shape, budget) for x in layers] == need
    assert blocks_for_budget((32, 9), factor_bytes((32, 9), 1)) == 1
    assert blocks_for_budget((32, 9), None, 4) == 4
    assert blocks_for_budget((32, 9), factor_bytes((32, 9), 5), 1) == 5
    cfg = FitConfig(fisher="empirical", max_factor_memory=budget)
    got = fit_curvature(model, task, batches, layers, cfg, progress=False)
    for layer, b in zip(layers, need):
        lc = got.layers[layer.name]
        assert len(lc.q_in.blocks) == b and len(lc.q_out.blocks) == b
        alone = fit_curvature(model, task, batches, [layer],
                              FitConfig(fisher="empirical", blocks=b), progress=False)
        torch.testing.assert_close(lc.eigenvalues, alone.layers[layer.name].eigenvalues,
                                   rtol=1e-10, atol=1e-14)
    with pytest.raises(DatasleuthError, match="max-factor-memory"):
        fit_curvature(model, task, batches, layers,
                      FitConfig(max_factor_memory=factor_bytes((32, 9), 1, False)),
                      progress=False)
    with pytest.raises(DatasleuthError, match="max_factor_memory"):
        FitConfig(max_factor_memory=0)


def test_estimate_counts_factors_queries_and_one_batch():
    shapes = {"a": (32, 9), "b": (8, 33)}
    est = estimate_memory(shapes, batch_size=3, seq_len=5, queries=4, rank=2)
    assert est.factors == factor_bytes((32, 9)) + factor_bytes((8, 33))
    pre = {n: torch.zeros(4, *s) for n, s in shapes.items()}
    assert est.queries == LowRankQueries.from_preconditioned(pre, rank=2).memory_bytes()
    full = estimate_memory(shapes, queries=4)
    assert full.queries == _bytes(pre.values())
    b, t = 3, 5
    assert est.batch == max(4 * (b * t * (p + m) + b * p * m) for p, m in shapes.values())
    assert "factors" in est.lines()[0] and "queries" in est.lines()[0]
    bases = 8 * (32 * 32 + 9 * 9 + 8 * 8 + 33 * 33)  # Q_S, Q_A of both layers, float64
    assert est.fit_peak == est.factors + bases // 2  # + their float32 copy
    assert "fit peak" in est.lines()[0]
    assert estimate_memory(shapes, curvature="kfac").fit_peak == est.factors
    assert estimate_memory(shapes, curvature="identity").factors == 0
    assert estimate_memory(shapes, curvature="diagonal").factors == 8 * (32 * 9 + 8 * 33)


def test_print_estimate_states_the_memory_before_a_run(capsys):
    from datasleuth.memory import print_estimate

    layers = find_layers(tiny_gpt2(), ["transformer.h.0.mlp.*"])
    cfg = FitConfig(max_factor_memory=factor_bytes((32, 9), 1) - 1)
    est = print_estimate(layers, cfg, batch_size=2, queries=3, rank=2)
    err = capsys.readouterr().err
    assert err.startswith("memory estimate: factors ") and "queries" in err
    assert "split into blocks" in err and est.blocks == {x.name: 2 for x in layers}
