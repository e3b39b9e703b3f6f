"""Quantised index rows (int8, int4): bounded rounding, the same search, more per byte."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import lm_batch, tiny_gpt2
from torch import nn
from torch.utils.data import TensorDataset

from datasleuth import DatasleuthError, FitConfig, RegressionTask, find_layers, fit_curvature
from datasleuth.lm.task import CausalLMTask
from datasleuth.scale.index import GradientIndex, IndexConfig, auto_config, build_index
from datasleuth.scale.index.codec import decode, encode, numbers_within, row_bytes
from datasleuth.scoring import precondition_queries

MLP = ["*.mlp.*"]


@pytest.mark.parametrize("dtype,top", [("int8", 127), ("int4", 7)])
def test_codes_round_trip_within_half_a_step(dtype, top):
    """Each number decodes within s/2 of itself, s = max|x| of its layer slice / L."""
    g = torch.Generator().manual_seed(0)
    widths = [5, 0, 8, 3]  # odd total: int4 pads the last byte; an empty slice
    rows = torch.randn(7, sum(widths), generator=g, dtype=torch.float64) * 10.0 ** torch.randint(
        -3, 3, (7, 1), generator=g)
    rows[2, :5] = 0.0  # an all-zero slice decodes to zeros
    stored = encode(rows, widths, dtype)
    assert stored["codes"].shape[1] == (16 if dtype == "int8" else 8)
    back = decode(stored, widths, dtype, torch.float64)
    for lo, w in zip([0, 5, 5, 13], widths):
        if w == 0:
            continue
        part, got = rows[:, lo : lo + w], back[:, lo : lo + w]
        step = part.abs().amax(1, keepdim=True) / top
        assert bool(((got - part).abs() <= step / 2 * (1 + 1e-6) + 1e-30).all())
    assert bool((back[2, :5] == 0).all())
    assert bool((back.abs().amax(1) <= rows.abs().amax(1) * (1 + 1e-6)).all())
    assert row_bytes(dtype, widths) == stored["codes"].shape[1] + 4 * len(widths)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_pack_and_unpack(bits):
    from datasleuth.scale.index.codec import _pack, _unpack

    g = torch.Generator().manual_seed(bits)
    for d in (1, 7, 8, 13):
        codes = torch.randint(0, 2**bits, (5, d), generator=g, dtype=torch.uint8)
        packed = _pack(codes, bits) if bits < 8 else codes
        assert packed.shape[1] == math.ceil(d * bits / 8)
        if bits < 8:
            assert torch.equal(_unpack(packed, bits, d), codes)


def test_two_and_one_bit_codes_are_the_least_squares_quantisers():
    """int2: Max's Gaussian four-level quantiser scaled by the slice's RMS; int1: the
    sign scaled by mean |x|; both checked against a direct computation."""
    g = torch.Generator().manual_seed(5)
    widths = [9, 4]
    rows = torch.randn(6, 13, generator=g) * torch.tensor([3.0] * 9 + [0.01] * 4)
    rows[1, 9:] = 0.0
    for dtype in ("int2", "int1"):
        back = decode(encode(rows, widths, dtype), widths, dtype, torch.float64)
        for lo, w in ((0, 9), (9, 4)):
            x = rows[:, lo : lo + w].double()
            if dtype == "int1":
                want = torch.where(x > 0, 1.0, -1.0) * x.abs().mean(1, keepdim=True)
            else:
                rms = x.square().mean(1, keepdim=True).sqrt()
                z = x / rms.clamp_min(1e-300)
                mag = torch.where(z.abs() > 0.9816, 1.510, 0.4528)
                t = torch.where(z > 0, mag, -mag)
                want = t * (x * t).sum(1, keepdim=True) / t.square().sum(1, keepdim=True)
            torch.testing.assert_close(back[:, lo : lo + w], want, rtol=1e-5, atol=1e-6)
        assert bool((back[1, 9:] == 0).all())
        # least squares: no other scale of the same codes fits the slice better
        x, got = rows[:, :9].double(), back[:, :9]
        for f in (0.9, 1.1):
            assert bool(((x - got).square().sum(1) <= (x - f * got).square().sum(1)).all())


def test_float_storage_passes_through_and_refuses_overflow():
    rows = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(decode(encode(rows, [6], "float64"), [6], "float64"), rows)
    with pytest.raises(DatasleuthError, match="float32"):
        encode(torch.full((1, 2), 1e6), [2], "float16")
    with pytest.raises(DatasleuthError, match="not finite"):
        encode(torch.tensor([[1.0, math.nan]]), [2], "int4")


def test_budget_holds_two_to_sixteen_times_the_numbers_of_float16():
    assert numbers_within(16384, "float16", 4) == 8192
    assert numbers_within(16384, "int8", 4) == 16384 - 16
    assert numbers_within(16384, "int4", 4) == 2 * (16384 - 16)
    assert numbers_within(16384, "int1", 4) == 8 * (16384 - 16)
    for dtype in ("int8", "int4", "int2", "int1"):
        widths = [numbers_within(16384, dtype, 4) // 4] * 4
        assert row_bytes(dtype, widths) <= 16384


def _linear_index(path, dtype, n=900, append=False, seed=0):
    torch.manual_seed(0)
    model = nn.Linear(24, 12)
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 24, generator=g), torch.randn(n, 12, generator=g))
    cfg = IndexConfig(k_in=16, k_out=8, dtype=dtype, shard_size=400)
    return build_index(model, RegressionTask(), data, None, path, cfg, batch_size=128,
                       append=append, progress=False)


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2", "int1"])
def test_quantised_index_searches_its_decoded_rows(tmp_path, dtype):
    """Exact search, gathering and ANN re-scoring all read the same decoded rows, and
    those rows are the float32 index's rows to within the rounding bound."""
    ref = _linear_index(tmp_path / "f32", "float32")
    index = _linear_index(tmp_path / dtype, dtype)
    rows, want = index.load_rows(torch.float64), ref.load_rows(torch.float64)
    bits = {"int8": 8, "int4": 4, "int2": 2, "int1": 1}[dtype]
    if bits >= 4:
        step = want.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
        assert bool(((rows - want).abs() <= step / 2 * (1 + 1e-5)).all())
    cos = torch.nn.functional.cosine_similarity(rows, want, dim=1)
    assert float(cos.mean()) > {8: 0.999, 4: 0.98, 2: 0.8, 1: 0.55}[bits]  # heavy tails
    assert index.bytes_per_row == 128 * bits // 8 + 4
    shard = (tmp_path / dtype / index.shards[0]["file"]).stat().st_size
    assert shard < 400 * index.bytes_per_row + 1024  # the codes, not floats, are on disk
    q = torch.randn(4, index.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    top = torch.topk(q @ rows.t(), 20, dim=1)
    ids, scores = index.search(q, k=20)
    assert torch.equal(ids, top.indices)
    torch.testing.assert_close(scores, top.values)
    picked = torch.tensor([899, 0, 401, 400, 399])
    torch.testing.assert_close(index.gather_rows(picked, torch.float64), rows[picked])
    ann, ann_scores = GradientIndex.open(tmp_path / dtype).search(q.float(), k=20, exact=False)
    torch.testing.assert_close(ann_scores, (q.float() @ rows.float().t()).gather(1, ann))


def test_quantised_append_keeps_the_rows_built_before(tmp_path):
    one = _linear_index(tmp_path / "one", "int4", n=900)
    _linear_index(tmp_path / "two", "int4", n=900)  # the same data again ...
    two = _linear_index(tmp_path / "two", "int4", n=500, append=True, seed=3)  # ... plus more
    assert two.rows == 1400
    torch.testing.assert_close(two.load_rows()[:900], one.load_rows(), rtol=0, atol=0)


def test_int4_rows_agree_with_float_rows_on_an_lm(tmp_path):
    """On a tiny LM, int4 EK-FAC-whitened rows score like float32 ones (Pearson ≥ 0.99),
    and in the same bytes per sequence hold about four times the coordinates of float16."""
    model, task = tiny_gpt2(vocab=13), CausalLMTask()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 13, (int(t),), generator=g).tolist()
            for t in torch.randint(4, 9, (16,), generator=g)]
    batches = [lm_batch(seqs[i : i + 4]) for i in range(0, 16, 4)]
    curv = fit_curvature(model, task, batches, MLP, FitConfig(fisher="empirical"),
                         progress=False)
    layers = find_layers(model, MLP)
    built = {}
    for dtype in ("float32", "int4", "float16"):
        cfg, _ = auto_config(IndexConfig(dtype=dtype, whitening="ekfac", projection="eigen",
                                         shard_size=6), layers, curv, 512)
        built[dtype] = build_index(model, task, seqs, MLP, tmp_path / dtype, cfg, batch_size=4,
                                   collate_fn=lm_batch, progress=False, curvature=curv)
        assert built[dtype].bytes_per_row <= 512
    assert built["int4"].dim >= 3.5 * built["float16"].dim
    same = build_index(model, task, seqs, MLP, tmp_path / "same",
                       replace(built["int4"].config, dtype="float32"), batch_size=4,
                       collate_fn=lm_batch, progress=False, curvature=curv)
    q = precondition_queries(model, task, same.curvature, [lm_batch(seqs[:3])],
                             features=same.features)
    a, b = same.scores(q).flatten(), built["int4"].scores(q).flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) >= 0.99



def test_encoding_leaves_its_input_alone():
    rows = torch.randn(4, 10)
    keep = rows.clone()
    for dtype in ("int8", "int4"):
        encode(rows, [6, 4], dtype)
        assert torch.equal(rows, keep)


def test_auto_storage_trades_bits_for_coordinates_until_all_fit(tmp_path):
    """Few bytes: one bit per coordinate keeps the most energy; once every coordinate
    fits at more bits, more bits; build_index refuses an unresolved 'auto'."""
    from datasleuth.scale.index.sizing import choose_storage

    model, task = tiny_gpt2(vocab=13), CausalLMTask()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 13, (8,), generator=g).tolist() for _ in range(8)]
    curv = fit_curvature(model, task, [lm_batch(seqs)], MLP, FitConfig(fisher="empirical"),
                         progress=False)
    layers = find_layers(model, MLP)
    size = sum(ly.grad_shape[0] * ly.grad_shape[1] for ly in layers)
    small, figures = choose_storage(layers, curv, size // 32)
    assert small == "int1" and figures["int1"] > figures["int2"] > figures["int4"]
    assert choose_storage(layers, curv, 4 * size)[0] == "int8"
    cfg, _ = auto_config(IndexConfig(dtype="auto", whitening="ekfac", projection="eigen"),
                         layers, curv, size // 32)
    assert cfg.dtype == "int1"
    with pytest.raises(DatasleuthError, match="auto_config"):
        build_index(model, task, seqs, MLP, tmp_path, IndexConfig(dtype="auto"),
                    collate_fn=lm_batch, progress=False)
