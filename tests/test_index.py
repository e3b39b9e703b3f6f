"""The projected-gradient index (docs/method.md §7, LoGra) against dense oracles and itself."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_batch, tiny_gpt2
from oracles import dense_ggn, dense_influence, loop_gradients
from safetensors.torch import load_file
from scipy.stats import pearsonr
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from datasleuth import ClassificationTask, DatasleuthError, RegressionTask, find_layers
from datasleuth.lm.task import CausalLMTask
from datasleuth.scale.index import (
    GradientIndex,
    IndexConfig,
    ProjectedScorer,
    build_index,
    fit_projected_curvature,
)
from datasleuth.scale.index.codec import stored_shapes
from datasleuth.scale.index.projection import _gaussian
from datasleuth.scoring import collect_scores, precondition_queries

MLP = ["*.mlp.*"]



def _queries(index, model, task, queries):
    """Projected, preconditioned query rows {layer: (Q, D_ℓ)} of an index."""
    return precondition_queries(model, task, index.curvature, queries, features=index.features)

def _sequences(n: int, vocab: int = 13, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g)
    return [torch.randint(1, vocab, (int(t),), generator=g).tolist() for t in lengths]


def _batches(seqs, size):
    return [lm_batch(seqs[i : i + size]) for i in range(0, len(seqs), size)]


def _query(seq: list[int], prompt: int) -> dict:
    q = lm_batch([seq])
    q["labels"][0, :prompt] = -100  # measurement = log p(completion | prompt)
    return q


class _Flaky:
    """A dataset that raises on rows >= ``fail_at`` while armed, and counts reads."""

    def __init__(self, items, fail_at=None):
        self.items, self.fail_at, self.reads = items, fail_at, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if self.fail_at is not None and i >= self.fail_at:
            raise RuntimeError("killed")
        self.reads.append(i)
        return self.items[i]


def test_rows_are_projected_loglik_gradients_and_projections_are_seeded(tmp_path):
    """Project-first rows equal P_out ∇(−L) P_inᵀ formed from for-loop gradients."""
    model, task = tiny_gpt2(vocab=13), CausalLMTask()
    seqs = _sequences(7)
    cfg = IndexConfig(k_in={"transformer.h.0.mlp.c_fc": 5}, k_out=3, dtype="float64",
                      shard_size=3)
    index = build_index(model, task, seqs, MLP, tmp_path / "a", cfg, batch_size=2,
                        collate_fn=lm_batch, progress=False)
    layers = find_layers(model, MLP)
    grads = loop_gradients(model, layers, [lm_batch([s]) for s in seqs],
                           lambda m, b: -task.loss(m, b).sum())
    rows = index.load_rows()
    assert rows.shape == (7, index.dim) and index.rows == 7 and len(index.shards) == 3
    for proj in index.projections:
        want = proj.project_dense(grads[proj.name])
        torch.testing.assert_close(rows[:, index.layer_slices[proj.name]], want)
    dims = {p.name: (p.k_out, p.k_in) for p in index.projections}
    assert dims == {"transformer.h.0.mlp.c_fc": (3, 5), "transformer.h.0.mlp.c_proj": (3, 16),
                    "transformer.h.1.mlp.c_fc": (3, 9), "transformer.h.1.mlp.c_proj": (3, 16)}
    p0 = index.projections[0].p_out
    big = _gaussian(64, 4096, 7)  # entries N(0, 1/k): column norms² have mean 1, sd √(2/k)
    norms = big.pow(2).sum(0)  # (4096,)
    assert abs(float(norms.mean()) - 1.0) < 4 * (2 / 64 / 4096) ** 0.5
    assert abs(float(norms.std()) - (2 / 64) ** 0.5) < 0.02
    assert abs(float(big.mean())) < 4 / (64 * 4096) ** 0.5 / 8
    again = build_index(model, task, seqs[:2], MLP, tmp_path / "b", cfg, collate_fn=lm_batch,
                        progress=False)
    assert all(torch.equal(a.p_in, b.p_in) and torch.equal(a.p_out, b.p_out)
               for a, b in zip(index.projections, again.projections))
    other = build_index(model, task, seqs[:2], MLP, tmp_path / "c",
                        IndexConfig(k_in=5, k_out=3, seed=1), collate_fn=lm_batch, progress=False)
    assert not torch.equal(other.projections[0].p_out, p0)
    assert not torch.equal(index.projections[2].p_out, p0)  # per-layer seeds


def test_identity_projection_equals_dense_influence(tmp_path):
    """Full-size identity projection + exact projected Fisher = dense per-layer influence."""
    model, task = tiny_gpt2(vocab=13), CausalLMTask()
    seqs = _sequences(9)
    cfg = IndexConfig(k_in=None, k_out=None, projection="identity", dtype="float64",
                      shard_size=4)
    index = build_index(model, task, seqs, MLP, tmp_path, cfg, batch_size=3,
                        collate_fn=lm_batch, progress=False)
    curv = fit_projected_curvature(model, task, _batches(seqs, 4), index, fisher="empirical",
                                   progress=False)
    queries = [_query(seqs[2], 3), _query(_sequences(1, seed=9)[0], 2)]
    got = index.scores(_queries(index, model, task, queries))  # (2, 9)

    layers = find_layers(model, MLP)
    train = loop_gradients(model, layers, [lm_batch([s]) for s in seqs],
                           lambda m, b: task.loss(m, b).sum())
    qg = loop_gradients(model, layers, queries, lambda m, b: task.measurement(m, b).sum())
    fisher = {n: torch.einsum("np,nq->pq", g.flatten(1), g.flatten(1)) / len(seqs)
              for n, g in train.items()}  # dense per-layer empirical Fisher
    damping = {n: 0.1 * float(torch.diagonal(f).mean()) for n, f in fisher.items()}
    assert curv.damping == pytest.approx(damping, rel=1e-10)
    want = dense_influence(qg, train, fisher, damping)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)
    assert int(got[0].argmax()) == 2 and float(got[0, 2]) > 0  # the query's own text wins

    reopened = GradientIndex.open(tmp_path, model, MLP)  # curvature comes back from disk
    again = reopened.scores(_queries(reopened, model, task, queries))
    assert torch.equal(again, got)


def test_projected_scorer_in_the_scan_equals_the_stored_rows(tmp_path):
    """The same projected scores, from stored rows or from a scan with ProjectedScorer."""
    model, task = tiny_gpt2(vocab=13), CausalLMTask()
    seqs = _sequences(7)
    index = build_index(model, task, seqs, MLP, tmp_path,
                        IndexConfig(k_in=3, k_out=5, dtype="float64", shard_size=3),
                        batch_size=2, collate_fn=lm_batch, progress=False)
    q = torch.randn(4, index.dim, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)
    scorers = {p.name: ProjectedScorer(p, q[:, index.layer_slices[p.name]])
               for p in index.projections}
    scanned = collect_scores(model, task, _batches(seqs, 3), scorers, progress=False)
    torch.testing.assert_close(scanned.total, index.scores(q), rtol=1e-10, atol=1e-12)


def test_sampled_fisher_index_tracks_dense_gauss_newton(mlp_data, tmp_path):
    """True-Fisher projected curvature against the exact per-layer damped GGN."""
    model, x, y = mlp_data
    task = ClassificationTask()
    data = TensorDataset(x, y)
    index = build_index(model, task, data, None, tmp_path,
                        IndexConfig(k_in=None, k_out=None, projection="identity",
                                    dtype="float64"), batch_size=5, progress=False)
    fit_projected_curvature(model, task, [(x, y)] * 60, index, progress=False)
    got = index.scores(_queries(index, model, task, [(x[:5], y[:5])]))
    layers = find_layers(model)
    ggn = {layer.name: dense_ggn(
        model, layer, [(x[i], y[i]) for i in range(len(x))],
        lambda m, params, ex: functional_call(m, params, (ex[0][None],))[0],
        lambda out, ex: F.cross_entropy(out[None], ex[1][None], reduction="sum"),
    ) for layer in layers}
    one = lambda a, b: [(a[i : i + 1], b[i : i + 1]) for i in range(len(a))]  # noqa: E731
    qg = loop_gradients(model, layers, one(x[:5], y[:5]),
                        lambda m, ex: task.measurement(m, ex).sum())
    tg = loop_gradients(model, layers, one(x, y), lambda m, ex: task.loss(m, ex).sum())
    want = dense_influence(qg, tg, ggn, index.curvature.damping)
    r = pearsonr(got.reshape(-1).numpy(), want.reshape(-1).numpy())[0]
    assert r > 0.97, r
    for name, g in ggn.items():  # the fitted matrix itself approaches the GGN
        err = (index.curvature.ggn[name] - g).norm() / g.norm()
        assert err < 0.25, (name, float(err))


@pytest.mark.parametrize("dtype", ["float32", "int1"])
def test_append_and_resume_equal_one_build_bitwise(tmp_path, dtype):
    model, task = tiny_gpt2(vocab=13), CausalLMTask()
    seqs = _sequences(23)
    cfg = IndexConfig(k_in=6, k_out=4, dtype=dtype, shard_size=5)
    kw = dict(batch_size=3, collate_fn=lm_batch, progress=False)
    ref = build_index(model, task, seqs, MLP, tmp_path / "one", cfg, **kw).load_rows()
    assert ref.dtype == torch.float32 and ref.shape[0] == 23

    build_index(model, task, seqs[:10], MLP, tmp_path / "two", cfg, **kw)
    two = build_index(model, task, seqs[10:], MLP, tmp_path / "two", cfg, append=True, **kw)
    assert two.rows == 23 and [s["start"] for s in two.shards] == [0, 5, 10, 15, 20]
    assert torch.equal(two.load_rows(), ref)

    flaky = _Flaky(seqs, fail_at=10)
    with pytest.raises(RuntimeError, match="killed"):
        build_index(model, task, flaky, MLP, tmp_path / "kill", cfg, **kw)
    killed = GradientIndex.open(tmp_path / "kill")
    assert killed.rows == 10 and not killed.complete
    flaky.fail_at, flaky.reads = None, []
    resumed = build_index(model, task, flaky, MLP, tmp_path / "kill", cfg, **kw)
    assert min(flaky.reads) == 10  # finished shards were skipped
    assert resumed.complete and torch.equal(resumed.load_rows(), ref)
    # a finished index is returned as is; re-running without append must not duplicate
    flaky.reads = []
    assert build_index(model, task, flaky, MLP, tmp_path / "kill", cfg, **kw).rows == 23
    assert flaky.reads == []
    manifest = json.loads((tmp_path / "kill" / "manifest.json").read_text())
    assert manifest["rows"] == 23 and manifest["config"]["k_in"] == 6
    shard = load_file(str(tmp_path / "kill" / "shard_00004.safetensors"))
    assert {k: tuple(v.shape) for k, v in shard.items()} == stored_shapes(
        dtype, 3, resumed.widths)

    if dtype == "float32":  # float16 storage is float32's rows, rounded
        half = IndexConfig(k_in=6, k_out=4, dtype="float16", shard_size=5)
        f16 = build_index(model, task, seqs, MLP, tmp_path / "f16", half, **kw).load_rows()
        assert f16.dtype == torch.float16
        torch.testing.assert_close(f16.float(), ref, rtol=2e-3, atol=1e-3)


def _regression_index(tmp_path, n=3000, shard_size=700):
    """A linear model on random data: n rows of random-looking projected gradients."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 24, generator=g)
    y = torch.randn(n, 12, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(24, 12)
    cfg = IndexConfig(k_in=16, k_out=8, dtype="float32", shard_size=shard_size)
    index = build_index(model, RegressionTask(), TensorDataset(x, y), None, tmp_path, cfg,
                        batch_size=256, progress=False)
    return model, index


def test_exact_search_equals_brute_force(tmp_path):
    _, index = _regression_index(tmp_path, n=1000, shard_size=130)
    stored = torch.cat([load_file(str(tmp_path / s["file"]))["rows"] for s in index.shards])
    q = torch.randn(6, index.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    brute = q @ stored.double().t()  # (Q, N)
    torch.testing.assert_close(index.scores(q), brute)
    for k in (1, 17, 300):
        ids, scores = index.search(q, k=k)
        want = torch.topk(brute, k, dim=1)
        assert torch.equal(ids, want.indices)
        torch.testing.assert_close(scores, want.values)
    ids, _ = index.search(q, k=5000)  # k above N returns every row, best first
    assert ids.shape == (6, 1000) and torch.equal(ids.sort(1).values[0], torch.arange(1000))


def test_faiss_approximate_recall(tmp_path):
    _, index = _regression_index(tmp_path)
    q = torch.randn(20, index.dim, generator=torch.Generator().manual_seed(2))
    exact_ids, exact_scores = index.search(q, k=10)
    # HNSW (the default) with default settings; IVF has no structure to exploit in random
    # data, so it needs about half of its 76 lists probed
    for method, kw in (("hnsw", {}), ("ivf", {"nprobe": 40})):
        ids, scores = index.search(q, k=10, exact=False, method=method, **kw)
        recall = sum(len(set(a.tolist()) & set(b.tolist()))
                     for a, b in zip(ids, exact_ids)) / exact_ids.numel()
        assert recall >= 0.9, (method, recall)
        full = index.scores(q)
        torch.testing.assert_close(scores, full.gather(1, ids))  # true scores, sorted
        assert bool((scores[:, :-1] >= scores[:, 1:]).all())
        assert (tmp_path / f"ann_{method}.faiss").is_file()
    stamp = (tmp_path / "ann_hnsw.faiss").stat().st_mtime_ns
    again = GradientIndex.open(tmp_path).search(q, k=10, exact=False)[0]  # read from disk
    assert torch.equal(again, index.search(q, k=10, exact=False)[0])
    assert (tmp_path / "ann_hnsw.faiss").stat().st_mtime_ns == stamp


def test_mismatched_model_layers_or_projection_are_refused(tmp_path):
    model, task = tiny_gpt2(vocab=13), CausalLMTask()
    seqs = _sequences(4)
    cfg = IndexConfig(k_in=4, k_out=4, dtype="float32", shard_size=2)
    build_index(model, task, seqs, MLP, tmp_path, cfg, collate_fn=lm_batch, progress=False)
    other = tiny_gpt2(vocab=13, seed=1)
    cases = [
        (lambda: GradientIndex.open(tmp_path, other), "different model"),
        (lambda: GradientIndex.open(tmp_path, model, ["*.attn.c_attn"]),
         "indexes 4 layers, not these 2 .layer 0: 'transformer.h.0.mlp.c_fc' there, "
         "'transformer.h.0.attn.c_attn' here"),
        (lambda: GradientIndex.open(tmp_path, config=IndexConfig(k_in=4, k_out=4, seed=3)),
         "seed: 0 there vs 3 here"),
        (lambda: build_index(model, task, seqs, MLP, tmp_path, IndexConfig(k_in=8),
                             collate_fn=lm_batch, progress=False),
         "k_in: 4 there vs 8 here; k_out: 4 there vs 16 here; dtype: 'float32' there vs "
         "'float16' here; shard_size: 2 there vs 4096 here"),
        (lambda: build_index(model, task, seqs, MLP, tmp_path,
                             IndexConfig(k_in={"transformer.h.0.mlp.c_fc": 5,
                                               "transformer.h.0.mlp.c_proj": 3}, k_out=4,
                                         dtype="float32", shard_size=2),
                             collate_fn=lm_batch, progress=False),
         "k_in: 4 there vs 5 here for 'transformer.h.0.mlp.c_fc' and 1 more layers"),
        (lambda: build_index(other, task, seqs, MLP, tmp_path, cfg, append=True,
                             collate_fn=lm_batch, progress=False), "different model"),
        (lambda: build_index(model, task, seqs[:3], MLP, tmp_path, cfg, collate_fn=lm_batch,
                             progress=False), "append=True"),
        (lambda: _queries(GradientIndex.open(tmp_path), model, task, [lm_batch(seqs[:1])]),
         "fit_projected_curvature"),
        (lambda: GradientIndex.open(tmp_path).search(torch.zeros(2, 3)), "precondition_queries"),
        (lambda: GradientIndex.open(tmp_path / "nothing"), "build_index"),
        (lambda: IndexConfig(k_in=0), "positive integer"),
        (lambda: IndexConfig(projection="identity"), "k_in=None"),
        (lambda: IndexConfig(dtype="bfloat16"), "float16"),
    ]
    for fn, fix in cases:
        with pytest.raises(DatasleuthError, match=fix) as err:
            fn()
        assert "\n" not in str(err.value)
    with pytest.raises(DatasleuthError, match="different model"):
        fit_projected_curvature(other, task, [lm_batch(seqs)], GradientIndex.open(tmp_path),
                                progress=False)
