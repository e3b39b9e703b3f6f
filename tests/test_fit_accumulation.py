"""The fit's running sums: widened in blocks, squares summed in reused buffers, checked by
their totals -- the same numbers as the plain expressions (docs/method.md §3)."""

from __future__ import annotations

import pytest
import torch

from datasleuth import DatasleuthError
from datasleuth.curvature import Basis, rotated_gradients
from datasleuth.finite import check_sums
from datasleuth.sums import Workspace, add_gram, add_widened, nonzero_rows, sum_of_squares


def _orthonormal(n: int, seed: int) -> Basis:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Basis([q])


@pytest.mark.parametrize("shape", [(7, 5), (1300, 900), (3, 1)])
def test_widened_blocks_equal_one_widened_add(shape):
    g = torch.Generator().manual_seed(0)
    total = torch.randn(shape, generator=g, dtype=torch.float64)
    x = torch.randn(shape, generator=g)
    want = total + x.double()
    add_widened(total, x)
    assert torch.equal(total, want)


@pytest.mark.parametrize("block", [64, 4, 3])  # whole product; strips of 4 and of 3 (ragged)
def test_gram_in_reused_buffers_equals_the_plain_product(monkeypatch, block):
    """Triangular strips (sums.add_gram) completed by sums.symmetrize: xᵀx summed."""
    import datasleuth.sums as sums

    monkeypatch.setattr(sums, "GRAM_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    work, total = Workspace(), torch.zeros(14, 14, dtype=torch.float64)
    xs = [torch.randn(10, 14, generator=g, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        add_gram(total, x, work)
    want = sum(x.t() @ x for x in xs)
    torch.testing.assert_close(total.tril(), want.tril(), rtol=1e-12, atol=1e-12)
    got = sums.symmetrize(total)
    assert torch.equal(got, got.t())
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(work._buffers) == 1  # one buffer for every batch of that width


@pytest.mark.parametrize("zeros", [False, True])  # all-zero tokens, as an expert layer sees
@pytest.mark.parametrize("tokens", [2, 40])  # per token and per sequence rotation
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def testsum_of_squares_equals_the_rotated_gradients_squared(tokens, dtype, zeros):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, tokens, 6, generator=g, dtype=dtype)
    s = torch.randn(4, tokens, 5, generator=g, dtype=dtype)
    if zeros:  # unrouted tokens (both zero), a zero input or gradient alone, a whole sequence
        a[0, ::2], s[0, ::2], a[1, -1], s[2, 0], a[3], s[3] = 0, 0, 0, 0, 0, 0
    for q_out, q_in in ((_orthonormal(5, 3), _orthonormal(6, 4)), (None, None)):
        if q_out is not None:
            q_out, q_in = Basis([q_out.blocks[0].to(dtype)]), Basis([q_in.blocks[0].to(dtype)])
        want = rotated_gradients(a, s, q_out, q_in).square().sum(0)
        got = sum_of_squares(a, s, q_out, q_in, Workspace())
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_example_gradients_over_live_tokens_equal_the_dense_sum(dtype):
    from datasleuth.layers import live_tokens, per_example_gradients

    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 9, 6, generator=g, dtype=dtype)
    s = torch.randn(4, 9, 5, generator=g, dtype=dtype)
    want = torch.einsum("btp,btm->bpm", s, a)
    assert live_tokens(a, s) is None  # dense: the batched product
    torch.testing.assert_close(per_example_gradients(a, s), want, rtol=0, atol=0)
    a[:, 1::2], s[0, ::3], a[3], s[2, :5] = 0, 0, 0, 0  # unrouted tokens, padding
    keep = live_tokens(a, s)
    assert keep is not None and not keep[3].any()
    want = torch.einsum("btp,btm->bpm", s, a)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(per_example_gradients(a, s), want, rtol=tol, atol=tol)


def test_all_zero_rows_are_dropped_only_when_that_pays():
    x = torch.randn(16, 3, dtype=torch.float64)
    assert nonzero_rows(x) is x
    x[:1] = 0  # 1 of 16 zero: kept whole
    assert nonzero_rows(x) is x
    x[::2] = 0
    x[3, 1] = float("nan")  # not zero: kept, so the running sums still see it
    got = nonzero_rows(x)
    assert got.shape == (8, 3) and got[1, 1].isnan()
    assert torch.equal(got.nan_to_num(), x[1::2].nan_to_num())


def test_sums_are_checked_by_their_totals():
    fine = {"layer": [torch.ones(3, 3, dtype=torch.float64)]}
    check_sums(fine, "the input covariance", 0)
    huge = {"layer": [torch.full((4, 4), 1e308, dtype=torch.float64)]}  # total overflows
    check_sums(huge, "the input covariance", 0)  # every entry is finite: accepted
    for bad in (float("nan"), float("inf")):
        t = torch.ones(3, 3, dtype=torch.float64)
        t[1, 2] = bad
        with pytest.raises(DatasleuthError, match="layer"):
            check_sums({"layer": [torch.ones(2)], "layer.two": [t]}, "the input covariance", 4)


@pytest.mark.parametrize("dead", [[0], [1, 2], [0, 3], [0, 1, 2, 3]])
def test_per_example_gradients_of_sequences_without_a_live_token_are_zero(dead):
    """First, middle, last and every sequence without a live token: exact zeros, however
    the output memory was left (it is allocated uninitialised)."""
    from datasleuth.layers import live_tokens, per_example_gradients

    g = torch.Generator().manual_seed(6)
    a = torch.randn(4, 16, 6, generator=g, dtype=torch.float64)
    s = torch.randn(4, 16, 5, generator=g, dtype=torch.float64)
    a[:, 1:] = 0  # one live token per sequence: the gathered path
    a[dead] = 0
    assert live_tokens(a, s) is not None
    for _ in range(3):  # reuse freed memory holding nonzero products
        got = per_example_gradients(a, s)
        assert torch.equal(got[dead], torch.zeros_like(got[dead]))
        torch.testing.assert_close(got, torch.einsum("btp,btm->bpm", s, a), rtol=1e-12,
                                   atol=1e-12)
