"""Models from disk: Llama-style nn.Linear MLPs, GPT-2 Conv1D, PEFT/LoRA adapters."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import lm_batch
from oracles import loop_gradients

from datasleuth import DatasleuthError, FitConfig, fit_curvature, pairwise_scores, top_k
from datasleuth.demo import build_tokenizer
from datasleuth.lm.model import default_layers, load_model
from datasleuth.lm.task import CausalLMTask
from datasleuth.scoring import collect_gradients

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _batches(tokenizer):
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:5]]
    return [lm_batch(ids[:3]), lm_batch(ids[3:])], ids


def _assert_loop_gradients(model, layers, tokenizer):
    """Per-sequence gradients of log p equal one backward pass per sequence (float64)."""
    batches, ids = _batches(tokenizer)
    task = CausalLMTask()
    got = collect_gradients(model, task, batches, layers, objective="loglik")
    want = loop_gradients(model, layers, [lm_batch([s]) for s in ids],
                          lambda m, ex: -task.loss(m, ex).sum())
    for ly in layers:
        torch.testing.assert_close(got[ly.name], want[ly.name], rtol=1e-9, atol=1e-11)
    return batches, ids


def test_llama_style_linear_mlp_from_disk(tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=32)
    path = _save(LlamaForCausalLM(cfg), tokenizer, tmp_path / "llama")
    model, tok = load_model(path, dtype="float64")
    layers = default_layers(model)
    assert [ly.name for ly in layers] == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj",
                                                                 "down_proj")]
    assert all(ly.kind == "linear" for ly in layers)
    assert "lm_head" not in {ly.name for ly in default_layers(model, attention=True)}
    assert any("self_attn" in ly.name for ly in default_layers(model, attention=True))
    batches, ids = _assert_loop_gradients(model, layers, tok)
    task = CausalLMTask()
    curv = fit_curvature(model, task, batches, layers, FitConfig(), progress=False)
    scores = pairwise_scores(model, task, curv, [lm_batch([ids[1]])], batches, progress=False)
    assert top_k(scores.total, 1)[0][0][0] == 1


def test_peft_lora_adapter_tracks_lora_matrices(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16,
                                      n_layer=1, n_head=2,
                                      bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id))
    base_dir = _save(base, tokenizer, tmp_path / "base")
    base = GPT2LMHeadModel.from_pretrained(base_dir)  # records base_model_name_or_path
    lora = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc", "c_proj"],
                                           fan_in_fan_out=True, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # as if trained: lora_B starts at zero
    adapter_dir = tmp_path / "adapter"
    lora.save_pretrained(adapter_dir)
    model, tok = load_model(adapter_dir, dtype="float64")
    layers = default_layers(model)
    names = [ly.name for ly in layers]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all(".mlp." in n for n in names)  # attention c_proj is not an MLP layer
    batches, ids = _batches(tok)
    task = CausalLMTask()
    got = collect_gradients(model, task, batches, layers, objective="loglik")
    assert not any(p.requires_grad for p in model.parameters())  # flags restored
    for ly in layers:
        ly.module.weight.requires_grad_(True)  # the loop reference needs weight gradients
    want = loop_gradients(model, layers, [lm_batch([s]) for s in ids],
                          lambda m, ex: -task.loss(m, ex).sum())
    for ly in layers:
        torch.testing.assert_close(got[ly.name], want[ly.name], rtol=1e-8, atol=1e-10)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base_dir)


def test_remote_code_is_not_run_by_default(tokenizer, tmp_path):
    from transformers import GPT2Config

    path = tmp_path / "custom"
    path.mkdir()
    cfg = GPT2Config(n_embd=8, n_layer=1, n_head=2).to_dict()
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    cfg["model_type"] = "evil-custom"
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(DatasleuthError, match="cannot load the model"):
        load_model(path)


def test_recurrent_gemma_mlp_block_is_found_and_runs_without_a_cache(tokenizer):
    """RecurrentGemma names its MLP ``mlp_block``, and its forward fails when asked to
    build a key/value cache for a plain pass; the task asks for none."""
    from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

    torch.manual_seed(0)
    cfg = RecurrentGemmaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24,
                               num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, lru_width=16, attention_window_size=16,
                               block_types=["recurrent"])  # no attention layer to cache
    model = RecurrentGemmaForCausalLM(cfg).double().eval()
    layers = default_layers(model)
    assert {ly.name.split(".")[-2] for ly in layers} == {"mlp_block"}
    _assert_loop_gradients(model, layers, tokenizer)


def test_default_layers_of_a_multimodal_model_are_its_text_decoders(tokenizer):
    """Gemma 3 (4B and up) loads as Gemma3ForConditionalGeneration: its vision tower's
    MLPs match the default patterns but never run on text, so they are not defaults."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         vocab_size=len(tokenizer)),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(cfg).double().eval()
    layers = default_layers(model)
    assert [ly.name for ly in layers] == [
        f"model.language_model.layers.{i}.mlp.{p}" for i in range(2)
        for p in ("gate_proj", "up_proj", "down_proj")]
    _assert_loop_gradients(model, layers, tokenizer)
