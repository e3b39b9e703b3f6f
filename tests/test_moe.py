"""Mixture-of-experts weights tracked per expert (datasleuth.experts).

A tiny transformers Mixtral (fused 3-D expert parameters, routed tokens) must give the
same curvature and scores per expert as the same model whose experts are plain
``nn.Linear`` layers applied to every token with the unrouted tokens' inputs zeroed
(their routing weight is zero): float64, EK-FAC and K-FAC, pairwise and self-influence.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_batch
from torch import nn

from datasleuth import FitConfig, find_layers, fit_curvature, pairwise_scores, self_influence
from datasleuth.errors import DatasleuthError
from datasleuth.layers import layers_by_name
from datasleuth.lm.task import CausalLMTask
from datasleuth.scoring import collect_gradients

EXPERTS = 4


def _mixtral(experts: int = EXPERTS):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=13, hidden_size=8, intermediate_size=6, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2,
                        num_local_experts=experts, num_experts_per_tok=2,
                        max_position_embeddings=32, tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg).double().eval()
    for p in model.parameters():  # larger weights than the default init: routing varies
        p.data.normal_(0.0, 0.3)
    return model


class LinearExperts(nn.Module):
    """The same experts as nn.Linear layers on every token; unrouted inputs zeroed."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.act_fn = fused.act_fn
        self.gate_up_proj = nn.ModuleList(self._linear(w) for w in fused.gate_up_proj.detach())
        self.down_proj = nn.ModuleList(self._linear(w) for w in fused.down_proj.detach())

    @staticmethod
    def _linear(w: torch.Tensor) -> nn.Linear:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False).double()
        layer.weight.data.copy_(w)
        return layer

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)  # (B*T, D)
        for e, (up, down) in enumerate(zip(self.gate_up_proj, self.down_proj)):
            hit = top_k_index == e  # (B*T, k)
            weight = (top_k_weights * hit).sum(-1, keepdim=True)  # 0 where not routed
            routed = hit.any(-1, keepdim=True).to(hidden.dtype)
            gate, lin = up(hidden * routed).chunk(2, dim=-1)
            out = out + down(self.act_fn(gate) * lin) * weight
        return out


def _reference(model):
    ref = copy.deepcopy(model)
    for block in ref.model.layers:
        block.mlp.experts = LinearExperts(block.mlp.experts)
    return ref


def _batches():
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 13, (int(n),), generator=g).tolist() for n in (7, 5, 9, 4, 8, 6, 3)]
    return [lm_batch(seqs[i:i + 3]) for i in range(0, len(seqs), 3)]


def test_expert_layers_are_found_by_name():
    model = _mixtral()
    names = [layer.name for layer in find_layers(model, ["*.experts.*"])]
    assert names == [f"model.layers.{i}.mlp.experts.{p}.{e}" for i in range(2)
                     for p in ("gate_up_proj", "down_proj") for e in range(EXPERTS)]
    layer = layers_by_name(model, ["model.layers.1.mlp.experts.down_proj.3"])[0]
    assert layer.grad_shape == (8, 6) and layer.kind == "expert"
    torch.testing.assert_close(layer.canonical_weight(),
                               model.model.layers[1].mlp.experts.down_proj[3])
    with pytest.raises(DatasleuthError, match="expert layer"):
        layers_by_name(model, ["model.layers.1.mlp.experts.down_proj.9"])
    with pytest.raises(DatasleuthError, match="exclude the expert layers"):
        layer.weight_gradient(torch.zeros(8, 6))


@pytest.mark.parametrize("kind", ["ekfac", "kfac"])
def test_per_expert_tracking_equals_linear_experts(kind):
    model = _mixtral()
    ref = _reference(model)
    batch = _batches()[0]
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits)
    # grouped_mm cannot run float64: the fit below passes only because capture
    # switches the experts to the eager loop, and it must switch them back after.
    model.config._experts_implementation = "grouped_mm"
    task, config = CausalLMTask(), FitConfig(curvature=kind, fisher="empirical")
    got = fit_curvature(model, task, _batches(), ["*.experts.*"], config, progress=False)
    want = fit_curvature(ref, task, _batches(), ["*.experts.*"], config, progress=False)
    assert got.layer_names == want.layer_names and len(got.layer_names) == 4 * EXPERTS
    for name, layer in want.layers.items():
        torch.testing.assert_close(got.layers[name].dense(), layer.dense(),
                                   rtol=1e-9, atol=1e-12)
    if kind == "kfac":
        return
    queries = [lm_batch([[1, 2, 3, 4]]), lm_batch([[5, 6, 7]])]
    for scores in ((pairwise_scores(model, task, got, queries, _batches(), progress=False),
                    pairwise_scores(ref, task, want, queries, _batches(), progress=False)),
                   (self_influence(model, task, got, _batches(), progress=False),
                    self_influence(ref, task, want, _batches(), progress=False))):
        a, b = scores
        assert a.total.abs().max() > 0
        torch.testing.assert_close(a.per_layer, b.per_layer, rtol=1e-8, atol=1e-10)
    assert model.config._experts_implementation == "grouped_mm"


def test_experts_no_token_was_routed_to_score_zero():
    """One 2-token sequence reaches at most 4 of 8 experts per layer; the others still
    report (zero) inputs and gradients in every batch, as a linear layer would."""
    model = _mixtral(experts=8)
    ref = _reference(model)
    task, config = CausalLMTask(), FitConfig(fisher="empirical")
    data = [lm_batch([[1, 2]]), lm_batch([[3, 4], [5]])]
    got = fit_curvature(model, task, data, ["*.experts.*"], config, progress=False)
    want = fit_curvature(ref, task, data, ["*.experts.*"], config, progress=False)
    a = self_influence(model, task, got, data[:1], progress=False)
    b = self_influence(ref, task, want, data[:1], progress=False)
    torch.testing.assert_close(a.per_layer, b.per_layer, rtol=1e-8, atol=1e-10)
    assert (a.per_layer == 0).sum() >= 8  # 2 parameters x 2 layers x >= 4 idle experts


def _gpt_oss():
    """GPT-OSS stores experts transposed, (E, M, P), and runs ``x @ param[e]``."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=13, hidden_size=8, intermediate_size=6, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                       num_local_experts=EXPERTS, num_experts_per_tok=2,
                       max_position_embeddings=32, layer_types=["full_attention"])
    model = GptOssForCausalLM(cfg).double().eval()
    for p in model.parameters():
        p.data.normal_(0.0, 0.3)
    return model


def _llama4():
    """Llama 4 runs every expert on every token in one bmm, (E, M, P) weights."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    cfg = Llama4TextConfig(vocab_size=13, hidden_size=8, intermediate_size=6,
                           intermediate_size_mlp=10, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=4, num_local_experts=EXPERTS,
                           num_experts_per_tok=1, max_position_embeddings=32,
                           layer_types=["full_attention"], no_rope_layers=[1], moe_layers=[0])
    model = Llama4ForCausalLM(cfg).double().eval()
    for p in model.parameters():
        p.data.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("build, block", [(_gpt_oss, "mlp"), (_llama4, "feed_forward")])
def test_transposed_experts_give_each_sequence_its_autograd_gradient(build, block):
    model = build()
    experts = getattr(model.model.layers[0], block).experts
    layers = find_layers(model, ["*.experts.*"])
    assert len(layers) == 2 * EXPERTS and all(ly.transposed for ly in layers)
    down = layers_by_name(model, [f"model.layers.0.{block}.experts.down_proj.1"])[0]
    assert down.grad_shape == (8, 6)  # (P, M): hidden <- intermediate
    torch.testing.assert_close(down.canonical_weight(), experts.down_proj[1].t())
    task = CausalLMTask()
    batches = _batches()
    before = model.config._experts_implementation
    got = collect_gradients(model, task, batches, layers, objective="loglik")
    assert model.config._experts_implementation == before  # restored after capture
    model.config._experts_implementation = "eager"  # the reference's backward runs float64
    seqs = [s[m.bool()].tolist() for b in batches
            for s, m in zip(b["input_ids"], b["attention_mask"])]
    for n, seq in enumerate(seqs):
        model.zero_grad()
        (-task.loss(model, lm_batch([seq]))).sum().backward()
        for ly in layers:
            want = getattr(experts, ly.param).grad[ly.expert].t()
            torch.testing.assert_close(got[ly.name][n], want, rtol=1e-9, atol=1e-12)
    assert sum(float(got[ly.name].abs().sum()) for ly in layers) > 0


def test_experts_run_without_the_eager_loop_are_refused(monkeypatch):
    """If the routed loop cannot be seen (here: capture does not switch to it), the
    experts would look idle and score zero; that must be an error, not zeros."""
    import datasleuth.layers

    model = _mixtral().float()
    model.config._experts_implementation = "batched_mm"
    monkeypatch.setattr(datasleuth.layers, "eager_experts", lambda modules: [])
    with pytest.raises(DatasleuthError, match="without the per-expert loop"):
        fit_curvature(model, CausalLMTask(), _batches(), ["*.experts.*"], FitConfig(),
                      progress=False)


def test_modules_outside_the_experts_interface_are_not_tracked():
    """3-D weights of a module neither transformers' experts interface built nor known as
    dense (datasleuth.experts.DENSE_EXPERTS) have no readable layout: left out, not
    guessed."""

    class DenseExperts(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_experts = 2
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 4, 6))

    with pytest.raises(DatasleuthError, match="no Linear/Conv1D/expert layer"):
        find_layers(DenseExperts())


def test_a_linear_router_returning_a_tuple_is_refused_and_not_tracked_by_default():
    from transformers import PhimoeConfig, PhimoeForCausalLM

    from datasleuth.lm.model import default_layers

    torch.manual_seed(0)
    cfg = PhimoeConfig(vocab_size=13, hidden_size=8, intermediate_size=6, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, num_local_experts=EXPERTS,
                       num_experts_per_tok=2, max_position_embeddings=32)
    model = PhimoeForCausalLM(cfg).double().eval()
    names = [ly.name for ly in default_layers(model)]
    assert names and not any("router" in n for n in names)
    task = CausalLMTask()
    fit_curvature(model, task, _batches(), names, FitConfig(), progress=False)
    with pytest.raises(DatasleuthError, match="not a plain linear map"):
        fit_curvature(model, task, _batches(), ["*.router"], FitConfig(), progress=False)
