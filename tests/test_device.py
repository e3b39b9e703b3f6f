"""The same answers on an accelerator as on the CPU (skipped where there is none).

Fitting, scoring, query batching and the projected index of a float64 GPT-2 on CUDA
must equal the CPU run: the device is a setting that must not change the answer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_batch, tiny_gpt2

from datasleuth import FitConfig, fit_curvature, pairwise_scores, self_influence, token_scores
from datasleuth.lm.task import CausalLMTask
from datasleuth.scale import (
    IndexConfig,
    LowRankQueries,
    build_index,
    fit_projected_curvature,
    low_rank_scores,
)
from datasleuth.scoring import precondition_queries

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TRAIN = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [2, 4, 6, 8, 10, 1, 3], [5, 5, 6], [9, 1, 2, 3]]
QUERIES = [[1, 2, 3, 4], [9, 8, 7, 6, 5]]


def _batches(rows, size):
    return [lm_batch(rows[i : i + size]) for i in range(0, len(rows), size)]


def _run(model, tmp_path, tag):
    task = CausalLMTask()
    train, queries = _batches(TRAIN, 2), _batches(QUERIES, 2)
    curv = fit_curvature(model, task, train, ["*.mlp.*"], FitConfig(), progress=False)
    pair = pairwise_scores(model, task, curv, queries, train, progress=False)
    selfi = self_influence(model, task, curv, train, progress=False)
    pre = precondition_queries(model, task, curv, queries, progress=False)
    tokens = token_scores(model, task, pre, train[0])
    low = low_rank_scores(model, task, LowRankQueries.from_preconditioned(pre, 2), train,
                          progress=False)
    items = [{k: v[0] for k, v in lm_batch([r]).items()} for r in TRAIN]
    items = [{**it, "input_ids": torch.nn.functional.pad(it["input_ids"], (0, 7 - len(r))),
              "attention_mask": torch.nn.functional.pad(it["attention_mask"], (0, 7 - len(r))),
              "labels": torch.nn.functional.pad(it["labels"], (0, 7 - len(r)), value=-100)}
             for it, r in zip(items, TRAIN)]
    index = build_index(model, task, items, ["*.mlp.*"], tmp_path / tag,
                        IndexConfig(k_in=4, k_out=4, dtype="float64"), batch_size=2,
                        progress=False)
    fit_projected_curvature(model, task, train, index, progress=False)
    found = index.scores(precondition_queries(model, task, index.curvature, queries,
                                             features=index.features))
    return {"eigenvalues": torch.stack([c.eigenvalues.sum() for c in curv.layers.values()]),
            "pairwise": pair.per_layer, "self": selfi.total, "tokens": tokens,
            "low_rank": low.per_layer, "index": found}


def test_cuda_equals_cpu_in_float64(tmp_path):
    model = tiny_gpt2()
    cpu = _run(model, tmp_path, "cpu")
    cuda = _run(copy.deepcopy(model).cuda(), tmp_path, "cuda")
    for key, want in cpu.items():
        got = cuda[key].cpu()
        assert got.device.type == "cpu" and got.dtype == want.dtype, key
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10, msg=key)
