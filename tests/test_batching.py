"""Query batching with low-rank query gradients (docs/method.md §4) against full-rank scoring."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, loader, tiny_gpt2
from torch.utils.data import TensorDataset

from datasleuth import (
    ClassificationTask,
    DatasleuthError,
    FitConfig,
    find_layers,
    fit_curvature,
    pairwise_scores,
    top_k,
)
from datasleuth.evaluation.metrics import pearson
from datasleuth.lm.task import CausalLMTask
from datasleuth.scale import batching
from datasleuth.scale.batching import (
    LowRankQueries,
    compress_queries,
    low_rank_scores,
    memory_numbers,
    rescore,
    scan_low_rank,
    subset_loader,
    top_candidates,
)
from datasleuth.scoring import collect_gradients, precondition_queries

LENGTHS = [7, 5, 8, 6, 3, 8, 4]  # 7 sequences: padding everywhere, no batch size of 3 divides


@pytest.fixture(scope="module")
def lm_setup():
    """Tiny float64 GPT-2, EK-FAC on its MLP layers, 3 queries, 7 padded training sequences.

    Gradient shapes (P, M+1): c_fc (32, 9) and c_proj (8, 33), so ranks 1..8 truncate.
    """
    model = tiny_gpt2(vocab=13)
    task = CausalLMTask()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 13, (n,), generator=g).tolist() for n in LENGTHS]
    layers = find_layers(model, ["*.mlp.*"])
    curv = fit_curvature(model, task, [lm_batch(seqs)], layers, FitConfig(), progress=False)
    q1, q2 = lm_batch([seqs[2], seqs[5]]), lm_batch([[3, 1, 4, 1, 5, 9]])
    q1["labels"][:, :3] = -100  # prompts of 3 tokens, completions scored
    queries = [q1, q2]
    pre = precondition_queries(model, task, curv, queries)  # {name: (3, P, M+1)}
    ref = pairwise_scores(model, task, curv, queries, [lm_batch(seqs)], progress=False)
    return model, task, curv, seqs, queries, pre, ref


def _awkward(seqs: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    """Batches of 3, 3, 1: sizes that do not divide N = 7, each padded differently."""
    return [lm_batch(seqs[i : i + 3]) for i in range(0, len(seqs), 3)]


def _exact_factors(pre: dict[str, torch.Tensor]) -> LowRankQueries:
    """Ṽ = (U diag σ) Vᵀ at full SVD rank, stored as factors so the token path scores it."""
    left, right = {}, {}
    for name, v in pre.items():
        u, s, vh = torch.linalg.svd(v, full_matrices=False)
        left[name], right[name] = u * s[:, None, :], vh
    rank = max(min(v.shape[1:]) for v in pre.values())
    return LowRankQueries(left, right, {}, rank, list(pre))


def test_token_path_at_full_rank_equals_pairwise_with_padding_and_odd_batches(lm_setup):
    model, task, _, seqs, _, pre, ref = lm_setup
    starts, parts = [], []

    def on_scores(start: int, s: torch.Tensor) -> None:
        starts.append(start)
        parts.append(s)

    scan_low_rank(model, task, _exact_factors(pre), _awkward(seqs), on_scores, progress=False)
    assert starts == [0, 3, 6] and [p.shape for p in parts] == [(3, 3, 4), (3, 3, 4), (1, 3, 4)]
    got = torch.cat(parts).permute(1, 0, 2)  # (Q, N, L)
    torch.testing.assert_close(got, ref.per_layer, rtol=0, atol=1e-10)
    assert ref.total.abs().max() > 1e-3  # the comparison is not between near-zero numbers


def test_rank_at_least_every_layer_keeps_queries_exact(lm_setup):
    model, task, _, seqs, _, pre, ref = lm_setup
    queries = LowRankQueries.from_preconditioned(pre, rank=9)  # min(P, M+1) = 9 and 8
    assert not queries.left and sorted(queries.full) == sorted(pre)
    got = low_rank_scores(model, task, queries, _awkward(seqs), progress=False)
    torch.testing.assert_close(got.total, ref.total, rtol=0, atol=1e-10)
    assert got.layer_names == ref.layer_names


def test_scores_converge_to_full_rank_as_rank_grows(lm_setup):
    model, task, _, seqs, _, pre, ref = lm_setup
    layers = find_layers(model, ["*.mlp.*"])
    train_grads = collect_gradients(model, task, [lm_batch(seqs)], layers, "loglik")  # (N,P,M+1)
    errors, correlations = [], []
    for k in range(1, 10):
        queries = LowRankQueries.from_preconditioned(pre, rank=k)
        got = low_rank_scores(model, task, queries, _awkward(seqs), progress=False)
        # The scan scores exactly the approximated Ṽ ≈ L R, whatever the rank.
        dense = queries.dense()
        want = torch.stack([dense[n].flatten(1) @ train_grads[n].flatten(1).t()
                             for n in ref.layer_names], dim=-1)  # (Q, N, L)
        torch.testing.assert_close(got.per_layer, want, rtol=0, atol=1e-10)
        bound = 0.0
        for name, v in pre.items():
            sigma = torch.linalg.svdvals(v)  # (Q, r)
            residual = (v - dense[name]).flatten(1).norm(dim=1)  # (Q,)
            # Eckart-Young: the truncated SVD leaves exactly the trailing singular values.
            torch.testing.assert_close(residual, sigma[:, k:].norm(dim=1), rtol=1e-9, atol=1e-12)
            bound = bound + residual[:, None] * train_grads[name].flatten(1).norm(dim=1)[None]
        assert bool(((got.total - ref.total).abs() <= bound + 1e-12).all())  # Cauchy-Schwarz
        errors.append(float((got.total - ref.total).norm() / ref.total.norm()))
        correlations.append(pearson(got.total.flatten(), ref.total.flatten()))
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    # Exact from k = 8 on: c_proj is kept whole, and c_fc's Ṽ has rank <= 8 < 9 because its
    # input, a LayerNorm output, spans only an 8-dimensional affine subspace of R^9.
    assert errors[0] > 0.05 and errors[-1] < 1e-12, errors
    # the error falls monotonically (Eckart-Young); Pearson, centred, only nearly so
    assert all(b >= a - 0.01 for a, b in zip(correlations, correlations[1:])), correlations
    assert correlations[0] < 0.9 and correlations[-1] == pytest.approx(1.0, abs=1e-12)


def test_layer_smaller_than_rank_is_exact_on_mlp(mlp_data):
    model, x, y = mlp_data  # layers "0": (P, M+1) = (6, 5); "2": (3, 7)
    task = ClassificationTask()
    curv = fit_curvature(model, task, loader(x, y), None, progress=False)
    pre = precondition_queries(model, task, curv, loader(x[:4], y[:4]))
    ref = pairwise_scores(model, task, curv, loader(x[:4], y[:4]), loader(x, y), progress=False)
    queries = LowRankQueries.from_preconditioned(pre, rank=3)
    assert sorted(queries.left) == ["0"] and sorted(queries.full) == ["2"]
    assert queries.left["0"].shape == (4, 6, 3) and queries.right["0"].shape == (4, 3, 5)
    got = low_rank_scores(model, task, queries, loader(x, y, 6), progress=False)
    torch.testing.assert_close(got.per_layer[..., 1], ref.per_layer[..., 1], rtol=0, atol=1e-12)
    assert (got.per_layer[..., 0] - ref.per_layer[..., 0]).abs().max() > 1e-6  # truncated
    exact = low_rank_scores(model, task, _exact_factors(pre), loader(x, y, 6), progress=False)
    torch.testing.assert_close(exact.total, ref.total, rtol=0, atol=1e-10)


def test_query_chunks_do_not_change_scores(lm_setup, monkeypatch):
    model, task, _, seqs, _, pre, _ = lm_setup
    queries = LowRankQueries.from_preconditioned(pre, rank=3)
    whole = low_rank_scores(model, task, queries, _awkward(seqs), progress=False)
    monkeypatch.setattr(batching, "_CHUNK_ELEMENTS", 1)  # one query per GEMM
    chunked = low_rank_scores(model, task, queries, _awkward(seqs), progress=False)
    torch.testing.assert_close(chunked.per_layer, whole.per_layer, rtol=0, atol=1e-12)


def test_rescoring_candidates_gives_exact_full_rank_scores(lm_setup):
    model, task, _, seqs, _, pre, ref = lm_setup
    approx = low_rank_scores(model, task, LowRankQueries.from_preconditioned(pre, rank=1),
                             _awkward(seqs), progress=False)
    cand = top_candidates(approx.total, 2)
    want = sorted({i for row in top_k(approx.total, 2) for i, _ in row})
    assert cand.tolist() == want and len(want) < len(seqs)
    subset = subset_loader(seqs, cand, collate=lm_batch, batch_size=2)
    got = rescore(model, task, pre, subset)
    assert got.total.shape == (3, len(want))
    torch.testing.assert_close(got.total, ref.total[:, cand], rtol=0, atol=1e-10)
    torch.testing.assert_close(got.per_layer, ref.per_layer[:, cand], rtol=0, atol=1e-10)


def test_memory_bytes_matches_the_formula(lm_setup):
    *_, pre, _ = lm_setup
    shapes = {n: tuple(v.shape[1:]) for n, v in pre.items()}  # 2 × c_fc (32, 9), c_proj (8, 33)
    assert memory_numbers(shapes, 3, None) == sum(v.numel() for v in pre.values())
    # k = 4: every layer low rank, 4 (32 + 9) + 4 (8 + 33) = 328 numbers per block and query.
    assert memory_numbers(shapes, 3, 4) == 3 * 2 * 328
    # k = 8: c_proj has min(P, M+1) = 8 <= k and is kept whole: 8 (32 + 9) + 8 * 33.
    assert memory_numbers(shapes, 3, 8) == 3 * 2 * (328 + 264)
    for k in (1, 4, 8, 9, 32):
        queries = LowRankQueries.from_preconditioned(pre, rank=k)
        assert queries.memory_bytes() == memory_numbers(shapes, 3, k) * 8  # float64
        assert queries.shapes == shapes and queries.n_queries == 3
    f32 = LowRankQueries.from_preconditioned({n: v.float() for n, v in pre.items()}, rank=4)
    assert f32.memory_bytes() == memory_numbers(shapes, 3, 4) * 4


def test_compress_queries_batch_by_batch_and_concatenate(lm_setup):
    model, task, curv, seqs, queries, pre, _ = lm_setup
    got = compress_queries(model, task, curv, queries, rank=3)  # batches of 2 and 1 queries
    whole = LowRankQueries.from_preconditioned(pre, rank=3)
    assert got.n_queries == 3 and got.metadata["curvature"] == "ekfac"
    assert got.metadata["fingerprint"] == curv.metadata["fingerprint"]
    for name, v in whole.dense().items():
        torch.testing.assert_close(got.dense()[name], v, rtol=0, atol=1e-10)
    picked = got.select([2, 0])
    torch.testing.assert_close(picked.dense()[name], got.dense()[name][[2, 0]])


def test_save_load_round_trip(lm_setup, tmp_path):
    model, task, curv, seqs, _, pre, _ = lm_setup
    queries = LowRankQueries.from_preconditioned(pre, rank=8, metadata={"note": "q"})
    path = tmp_path / "queries.safetensors"
    queries.save(path)
    loaded = LowRankQueries.load(path)
    assert loaded.rank == 8 and loaded.layer_names == queries.layer_names
    assert loaded.metadata == {"note": "q"} and sorted(loaded.full) == sorted(queries.full)
    for attr in ("left", "right", "full"):
        mine, theirs = getattr(queries, attr), getattr(loaded, attr)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[n], theirs[n]) for n in mine)
    a = low_rank_scores(model, task, queries, _awkward(seqs), progress=False)
    b = low_rank_scores(model, task, loaded, _awkward(seqs), progress=False)
    assert torch.equal(a.per_layer, b.per_layer)
    assert [p.name for p in tmp_path.iterdir()] == ["queries.safetensors"]  # no temp left
    curv.save(tmp_path / "curv.safetensors")
    with pytest.raises(DatasleuthError, match="not low-rank queries"):
        LowRankQueries.load(tmp_path / "curv.safetensors")


def test_bad_input_is_refused_with_a_fix():
    v = torch.zeros(2, 6, 5, dtype=torch.float64)
    with pytest.raises(DatasleuthError, match="rank must be a positive integer"):
        LowRankQueries.from_preconditioned({"a": v}, rank=0)
    with pytest.raises(DatasleuthError, match=r"must be \(Q, P, M\+1\)"):
        LowRankQueries.from_preconditioned({"a": v[0]}, rank=2)
    with pytest.raises(DatasleuthError, match="left .* and right"):
        LowRankQueries({"a": v[:, :, :2]}, {"a": v[:, :3]}, {}, 2, ["a"])
    with pytest.raises(DatasleuthError, match="exactly once"):
        LowRankQueries({}, {}, {"a": v}, 2, ["a", "b"])
    with pytest.raises(DatasleuthError, match="same queries"):
        LowRankQueries({}, {}, {"a": v, "b": v[:1]}, 2, ["a", "b"])
    with pytest.raises(DatasleuthError, match="at least one candidate"):
        subset_loader(TensorDataset(v), [])


def test_randomized_svd_of_a_large_layer_is_near_optimal():
    from datasleuth.scale.svd import truncated_svd

    g = torch.Generator().manual_seed(0)
    # Rank-60 matrices rescaled entrywise, like preconditioned query gradients.
    v = torch.randn(3, 400, 60, generator=g, dtype=torch.float64) @ torch.randn(
        3, 60, 300, generator=g, dtype=torch.float64)
    v = v / (torch.rand(400, 300, generator=g, dtype=torch.float64) + 0.2)
    left, right = truncated_svd(v, 32)  # min(P, M+1) = 300 > 4 (32 + 16): randomized
    assert left.shape == (3, 400, 32) and right.shape == (3, 32, 300)
    sigma = torch.linalg.svdvals(v)
    optimal = sigma[:, 32:].norm(dim=1)
    residual = (v - left @ right).flatten(1).norm(dim=1)
    assert bool((residual >= optimal * (1 - 1e-9)).all())
    assert bool((residual <= optimal * 1.005).all()), (residual / optimal).tolist()
    # The same query always compresses to the same factors.
    again = truncated_svd(v, 32)
    assert torch.equal(again[0], left) and torch.equal(again[1], right)


@pytest.mark.parametrize("gather", [False, True])  # True: live tokens gathered (experts)
@pytest.mark.parametrize("block", [1 << 22, 81])  # Ṽ whole; c_fc 3 rows a time (of 32)
def test_token_and_reconstruct_paths_give_the_same_scores(lm_setup, monkeypatch, gather,
                                                          block):
    import datasleuth.layers
    import datasleuth.scale.batching

    monkeypatch.setattr(datasleuth.scale.batching, "_REBUILD_BLOCK", block)
    if gather:  # every batch takes the gathered-token path, padding left out
        monkeypatch.setattr(datasleuth.layers, "SPARSE_SHARE", 1.0)
    model, task, _, seqs, _, pre, ref = lm_setup
    queries = LowRankQueries.from_preconditioned(pre, rank=3)
    assert queries.left  # some layers are low rank
    got = {path: low_rank_scores(model, task, queries, _awkward(seqs), progress=False,
                                 path=path).per_layer
           for path in ("tokens", "reconstruct", "auto")}
    torch.testing.assert_close(got["reconstruct"], got["tokens"], rtol=0, atol=1e-10)
    torch.testing.assert_close(got["auto"], got["tokens"], rtol=0, atol=1e-10)
    assert got["tokens"].abs().max() > 1e-3  # not a comparison of near-zero numbers
    if gather:  # the same scores as every token taken whole
        monkeypatch.setattr(datasleuth.layers, "SPARSE_SHARE", 0.875)
        whole = low_rank_scores(model, task, queries, _awkward(seqs), progress=False,
                                path="tokens").per_layer
        torch.testing.assert_close(got["tokens"], whole, rtol=0, atol=1e-10)
    with pytest.raises(DatasleuthError, match="path must be one of"):
        low_rank_scores(model, task, queries, _awkward(seqs), progress=False, path="fast")
