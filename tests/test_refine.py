"""Independent labels per fitting pass, and refined inverse-curvature products (issue 9)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import loader

from datasleuth import ClassificationTask, FitConfig, fit_curvature
from datasleuth.task import _sample_categorical


class _Recording(ClassificationTask):
    """Classification whose sampled labels are kept, one tensor per batch."""

    def __init__(self) -> None:
        self.drawn: list[torch.Tensor] = []

    def sampled_loss(self, model, batch, generator):
        logits = model(batch[0])
        drawn = _sample_categorical(logits, generator)
        self.drawn.append(drawn)
        return F.cross_entropy(logits, drawn, reduction="none")


@pytest.mark.parametrize("shared", [False, True])
def test_fitting_passes_draw_their_own_seeded_labels(mlp_data, shared):
    model, x, y = mlp_data
    cfg = FitConfig(curvature="ekfac", seed=5, shared_labels=shared)
    task = _Recording()
    fit = fit_curvature(model, task, loader(x, y), None, cfg, progress=False)
    factors, eigen = torch.cat(task.drawn[:5]), torch.cat(task.drawn[5:])
    assert len(task.drawn) == 10 and factors.shape == eigen.shape == (23,)
    assert torch.equal(factors, eigen) == shared  # before the fix both passes saw the same
    again = _Recording()
    repeat = fit_curvature(model, again, loader(x, y), None, cfg, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(task.drawn, again.drawn))
    for name, layer in fit.layers.items():
        torch.testing.assert_close(repeat.layers[name].dense(), layer.dense(), rtol=0, atol=0)
