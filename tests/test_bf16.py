"""bf16 models end to end, with float32 statistics: scores agree with the float32 model."""

from __future__ import annotations

import copy

import torch
from conftest import lm_batch, tiny_gpt2

from datasleuth import FitConfig, fit_curvature, pairwise_scores
from datasleuth.lm.task import CausalLMTask
from datasleuth.scale.batching import compress_queries, low_rank_scores


def _seqs(n: int, t: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 11, (t,), generator=g).tolist() for _ in range(n)]


def test_bf16_scores_correlate_with_float32_scores():
    base = tiny_gpt2().float()
    train = [lm_batch(_seqs(4, 12, s)) for s in range(4)]
    queries = [lm_batch(_seqs(3, 12, 9))]
    task = CausalLMTask()
    cfg = FitConfig(fisher="empirical")
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to(dtype)
        curv = fit_curvature(model, task, train, ["*.mlp.*"], cfg, progress=False)
        for layer in curv.layers.values():  # statistics kept in float32 or better
            assert layer.eigenvalues.dtype == torch.float64 and layer.eigenvalues.isfinite().all()
        pair = pairwise_scores(model, task, curv, queries, train, progress=False)
        low = compress_queries(model, task, curv, queries, rank=2)
        got[dtype] = (pair.total, low_rank_scores(model, task, low, train, progress=False).total)
    for full32, full16 in zip(got[torch.float32], got[torch.bfloat16]):
        assert full16.dtype == torch.float32 and full16.isfinite().all()
        r = torch.corrcoef(torch.stack([full32.flatten(), full16.flatten()]))[0, 1]
        assert r >= 0.99, float(r)
        assert not torch.equal(full32, full16)  # the bf16 model really ran in bf16
