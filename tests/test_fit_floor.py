"""The fit's hot path: rotation order, batched eigendecompositions at a checked precision."""

from __future__ import annotations

import pytest
import torch

from datasleuth import curvature as curvature_module
from datasleuth.curvature import Basis, eigh_batched, rotated_gradients
from datasleuth.errors import DatasleuthError


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("blocks", [1, 3])
def test_per_token_and_per_sequence_rotation_give_the_same_eigenvalues(blocks):
    g = torch.Generator().manual_seed(0)
    b, t, p, m1 = 3, 5, 7, 6
    a = torch.randn(b, t, m1, generator=g, dtype=torch.float64)
    ds = torch.randn(b, t, p, generator=g, dtype=torch.float64)
    a[1, 3:] = 0.0  # padding
    ds[1, 3:] = 0.0
    sizes_out = [3, 2, 2][:blocks] if blocks > 1 else [p]
    sizes_in = [2, 2, 2][:blocks] if blocks > 1 else [m1]
    q_out = Basis([_orthogonal(n, g) for n in sizes_out])
    q_in = Basis([_orthogonal(n, g) for n in sizes_in])
    dense = q_out.dense().t() @ torch.einsum("btp,btm->bpm", ds, a) @ q_in.dense()
    tok = rotated_gradients(a, ds, q_out, q_in, per_token=True)
    seq = rotated_gradients(a, ds, q_out, q_in, per_token=False)
    auto = rotated_gradients(a, ds, q_out, q_in)
    for got in (tok, seq, auto):
        torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)
    # the corrected eigenvalues E_seq[(Q_Sᵀ DW̄ Q_A)^∘2] of the two orders
    torch.testing.assert_close(tok.square().mean(0), seq.square().mean(0), rtol=1e-12, atol=0)
    assert dense.abs().max() > 0.1


def test_rotation_order_follows_the_cost():
    """Long sequences rotate the summed gradient; short ones every token (same result)."""
    g = torch.Generator().manual_seed(1)
    q_out, q_in = Basis([_orthogonal(8, g)]), Basis([_orthogonal(4, g)])
    calls = []

    class Spy(Basis):
        def to_basis(self, v, dim):
            calls.append(tuple(v.shape))
            return super().to_basis(v, dim)

    spy_out = Spy(q_out.blocks)
    short = torch.randn(2, 1, 4, dtype=torch.float64), torch.randn(2, 1, 8, dtype=torch.float64)
    rotated_gradients(*short, spy_out, q_in)
    assert calls == [(2, 1, 8)]  # per token: T (64 + 16) = 80 < 8·16 + 4·64 = 384
    calls.clear()
    long = torch.randn(2, 9, 4, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)
    rotated_gradients(*long, spy_out, q_in)
    assert calls == [(2, 8, 4)]  # per sequence: 9 · 80 = 720 > 384


def _ill_conditioned(n: int, cond: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = _orthogonal(n, g)
    lam = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return (q * lam) @ q.t(), lam


def test_float32_eigendecomposition_agrees_with_float64_on_ill_conditioned_factors():
    """Stated tolerance: the damped inverse (C + λI)⁻¹ with λ = 0.1 × mean eigenvalue (the
    default damping) from the float32 decomposition is within 1e-4 (relative) of float64's,
    on factors with condition number 1e10; eigenvalues within 1e-6 × the largest."""
    factors = [_ill_conditioned(n, 1e10, s)[0] for n, s in ((96, 0), (96, 1), (40, 2))]
    got = eigh_batched(factors, "auto")
    ref = eigh_batched(factors, "float64")
    probe = torch.randn(96, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for c, (lam, q), (lam64, q64) in zip(factors, got, ref):
        assert q.dtype == torch.float64 and lam.min() >= 0
        damp = 0.1 * float(lam64.mean())
        x = probe[: c.shape[0]]
        inv = q @ ((q.t() @ x) / (lam + damp)[:, None])
        inv64 = q64 @ ((q64.t() @ x) / (lam64 + damp)[:, None])
        assert (inv - inv64).norm() / inv64.norm() < 1e-4
        assert (lam - lam64).abs().max() < 1e-6 * lam64.max()
    # auto really used float32 here: not float64-exact
    assert max(float((g[0] - r[0]).abs().max()) for g, r in zip(got, ref)) > 1e-14


def test_float32_results_failing_the_check_are_redone_in_float64(monkeypatch):
    c, _ = _ill_conditioned(30, 1e6, 4)
    monkeypatch.setattr(curvature_module, "EIGH_TOLERANCE", 0.0)
    (lam, q), = eigh_batched([c], "auto")
    (lam64, q64), = eigh_batched([c], "float64")
    torch.testing.assert_close(lam, lam64, rtol=0, atol=0)
    torch.testing.assert_close(q, q64, rtol=0, atol=0)
    with pytest.raises(DatasleuthError, match="precision"):
        eigh_batched([c], "half")


def test_batched_eigendecompositions_in_chunks_equal_one_at_a_time(monkeypatch):
    factors = [_ill_conditioned(n, 1e4, s)[0] for s, n in enumerate((12, 7, 12, 12))]
    monkeypatch.setattr(curvature_module, "_EIGH_BATCH_BYTES", 2 * 8 * 12 * 12)  # 2 a call
    for (lam, q), c in zip(eigh_batched(factors, "float64"), factors):
        ref_lam, ref_q = torch.linalg.eigh(c)
        torch.testing.assert_close(lam, ref_lam.clamp_min(0), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close((q * lam) @ q.t(), c, rtol=1e-9, atol=1e-12)


def test_sampled_labels_follow_the_softmax_and_never_draw_impossible_tokens(monkeypatch):
    """Inverse-CDF sampling (task._sample_categorical): frequencies within 5 standard
    errors of softmax(logits) in every row block, -inf logits never drawn, the same
    draws for the same seed whatever the block size, float64 logits left unchanged."""
    from datasleuth import task as task_module

    logits = torch.tensor([[0.0, 1.0, -1.0, float("-inf"), 2.0, -3.0]]).expand(60_000, 6)
    logits = logits.reshape(300, 200, 6)
    draws = task_module._sample_categorical(logits, torch.Generator().manual_seed(1))
    assert draws.shape == (300, 200) and draws.dtype == torch.long
    p = torch.softmax(logits[0, 0].double(), -1)
    freq = torch.bincount(draws.flatten(), minlength=6).double() / draws.numel()
    se = (p * (1 - p) / draws.numel()).sqrt()
    assert freq[3] == 0
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)
    monkeypatch.setattr(task_module, "_SAMPLE_CHUNK_BYTES", 8 * 6 * 7)  # 7-row blocks
    again = task_module._sample_categorical(logits, torch.Generator().manual_seed(1))
    assert torch.equal(again, draws)
    other = task_module._sample_categorical(logits, torch.Generator().manual_seed(2))
    assert not torch.equal(other, draws)
    wide = torch.randn(4, 5, dtype=torch.float64)
    kept = wide.clone()
    task_module._sample_categorical(wide, torch.Generator().manual_seed(0))
    assert torch.equal(wide, kept)  # float64 logits are not changed in place


def _inverse_cdf(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """The dense reference: the whole float64 CDF of every row, the same uniforms."""
    flat = logits.reshape(-1, logits.shape[-1]).double()
    u = torch.rand(flat.shape[0], 1, generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64)
    cdf = (flat - flat.amax(-1, keepdim=True)).exp().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_two_level_sampler_equals_the_dense_inverse_cdf(dtype, monkeypatch):
    """Block sums then the token within the block (task._draw_rows) draw what the dense
    float64 inverse CDF draws at the same uniforms: every draw for float64 logits, all but
    a few borderline ones for float32/bf16 (probabilities rounded at 1e-7); a vocabulary
    that does not fill its last block, and impossible tokens around block edges and in
    the ragged tail, are never drawn."""
    from datasleuth import task as task_module

    g = torch.Generator().manual_seed(3)
    vocab = 3 * task_module._CDF_BLOCK + 45  # the last block is ragged
    logits = (torch.randn(40, 500, vocab, generator=g) * 3).to(dtype)
    impossible = [0, 127, 128, 255, vocab - 45, vocab - 1]  # block edges, ragged tail
    logits[..., impossible] = float("-inf")
    logits[0, 0] = float("-inf")
    logits[0, 0, 200] = 0.0  # all mass on one token in a middle block
    monkeypatch.setattr(task_module, "_SAMPLE_CHUNK_BYTES", 8 * vocab * 333)  # ragged chunks
    draws = task_module._sample_categorical(logits, torch.Generator().manual_seed(5))
    ref = _inverse_cdf(logits, 5).reshape(draws.shape)
    assert draws[0, 0] == 200
    assert not torch.isin(draws, torch.tensor(impossible)).any()
    mismatches = int((draws != ref).sum())
    assert mismatches == 0 if dtype == torch.float64 else mismatches <= 5, mismatches


def test_fit_config_chooses_the_eigendecomposition_precision(monkeypatch):
    """FitConfig.eigh_precision reaches the eigendecompositions: "device" keeps float64 on
    a CPU, "auto" runs checked float32 there, and its EK-FAC agrees with float64's: the
    damped inverse within 1e-3 (looser than the factors' own 1e-4 above, since EK-FAC's
    corrected eigenvalues follow the basis chosen inside near-degenerate clusters); an
    unknown value is refused."""
    from conftest import lm_batch, tiny_gpt2

    from datasleuth import FitConfig, find_layers, fit_curvature
    from datasleuth import fitting as fitting_module
    from datasleuth.lm.task import CausalLMTask

    model = tiny_gpt2(vocab=13).float()
    layers = find_layers(model, ["*.mlp.*"])
    g = torch.Generator().manual_seed(0)
    batch = lm_batch(torch.randint(1, 13, (12, 10), generator=g).tolist())
    used = []
    inner = fitting_module.eigh_batched

    def spy(factors, precision="auto", consume=False):
        used.append(precision)
        return inner(factors, precision, consume)

    monkeypatch.setattr(fitting_module, "eigh_batched", spy)
    fits = {p: fit_curvature(model, CausalLMTask(), [batch], layers,
                             FitConfig(eigh_precision=p), progress=False)
            for p in ("device", "auto")}
    assert used == ["float64", "auto"]
    for name, ref in fits["device"].layers.items():
        got = fits["auto"].layers[name]
        x = torch.randn(3, *ref.eigenvalues.shape, generator=g, dtype=torch.float64)
        a, b = got.precondition(x), ref.precondition(x)
        assert float((a - b).norm() / b.norm()) < 1e-3
    with pytest.raises(DatasleuthError, match="eigh_precision"):
        FitConfig(eigh_precision="half")


def test_a_uniform_that_rounds_to_the_total_still_draws_a_possible_token():
    """u·C_V can round up to C_V; the draw is then the last possible token, never one of
    the impossible tokens after it (here the whole last block and the ragged tail)."""
    from datasleuth import task as task_module

    vocab = 2 * task_module._CDF_BLOCK + 7
    x = torch.zeros(3, vocab)
    x[:, 100:] = float("-inf")  # tokens 100.. impossible: block 0 holds all the mass
    u = torch.tensor([[0.0], [0.5], [1.0]], dtype=torch.float64)  # 1.0: the rounded case
    draws = task_module._draw_rows(x, u)
    assert draws.tolist() == [0, 50, 99]
