"""Search over many rows: blocked exact search, FAISS indices grown as shards are appended."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from datasleuth import RegressionTask
from datasleuth.scale.index import GradientIndex, IndexConfig, build_index
from datasleuth.scale.index.search import choose_method
from datasleuth.storage import read_json


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 24, generator=g), torch.randn(n, 12, generator=g))


def _build(path, data, append=False):
    torch.manual_seed(0)
    model = nn.Linear(24, 12)
    cfg = IndexConfig(k_in=16, k_out=8, dtype="float16", shard_size=400)
    return build_index(model, RegressionTask(), data, None, path, cfg, batch_size=256,
                       append=append, progress=False)


def _recall(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / b.numel()


def test_blocked_exact_search_equals_brute_force(tmp_path):
    index = _build(tmp_path, _data(1000, 0))
    rows = index.load_rows(torch.float64)
    q = torch.randn(5, index.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.topk(q @ rows.t(), 50, dim=1)
    blocks = list(index.iter_blocks(torch.float64, block_rows=97))
    assert [s for s, _ in blocks][:3] == [0, 97, 194] and sum(len(b) for _, b in blocks) == 1000
    ids, scores = index.search(q, k=50)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(scores, want.values)
    picked = torch.tensor([999, 0, 401, 400, 399])
    torch.testing.assert_close(index.gather_rows(picked, torch.float64), rows[picked])


def test_faiss_indices_grow_with_appended_shards(tmp_path):
    """HNSW and IVF-PQ built on the first shards are extended, not rebuilt, on append."""
    first = _build(tmp_path, _data(1200, 0))
    q = torch.randn(8, first.dim, generator=torch.Generator().manual_seed(2))
    for method in ("hnsw", "ivfpq"):
        first.search(q, k=10, exact=False, method=method)
    index = _build(tmp_path, _data(600, 1), append=True)
    assert index.rows == 1800
    exact, _ = index.search(q, k=10)
    for method, kw in (("hnsw", {}), ("ivfpq", {"nprobe": 10**6})):
        ids, scores = index.search(q, k=10, exact=False, method=method, **kw)
        meta = read_json(tmp_path / f"ann_{method}.json")
        assert len(meta["shards"]) == len(index.shards) and meta["rows"] == 1800
        assert meta["trained_rows"] == 1200  # extended in place
        assert _recall(ids, exact) >= 0.8, (method, _recall(ids, exact))
        torch.testing.assert_close(scores, index.scores(q).gather(1, ids))  # exact re-score
    again = GradientIndex.open(tmp_path).search(q, k=10, exact=False, method="hnsw")[0]
    assert torch.equal(again, index.search(q, k=10, exact=False, method="hnsw")[0])


def test_method_is_chosen_by_size():
    assert [choose_method(n) for n in (10**4, 10**5, 10**6)] == ["hnsw", "ivf", "ivfpq"]
