"""Which Hugging Face architectures datasleuth handles, checked on tiny random models.

For each transformers model type: build a two-block model from its config (random
weights, no download), save it with a small tokenizer and load it back as a user's
checkpoint (float64), take the default tracked layers, and check that every
sequence's gradient summed over the batch equals autograd's parameter gradient; then
fit EK-FAC and score one query, and report whether the scores are finite.

    python benchmarks/architectures.py                 # every type below, minutes
    python benchmarks/architectures.py gpt_oss llama4_text

Columns: layers tracked (and their kinds), share of the model's parameters they hold
(tiny models: the embedding dominates), the largest relative gradient error, finite
scores. A type transformers itself cannot build or run at these sizes shows its error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from datasleuth import FitConfig, fit_curvature, pairwise_scores
from datasleuth.demo import build_tokenizer
from datasleuth.lm.model import default_layers, load_model
from datasleuth.lm.task import CausalLMTask
from datasleuth.scoring import collect_gradients

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning"] * 4
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, head_dim=8, num_experts=4,
             num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
             shared_expert_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
             n_embd=32, n_layer=2, n_head=4, n_positions=64, d_model=32, n_layers=2,
             n_heads=4, ffn_dim=48, n_inner=48, num_layers=2, rotary_dim=4,
             first_k_dense_replace=0, ffn_hidden_size=48)
"""Small sizes under the names configs use; each is set only where the config has it."""
OWN = {  # types whose configs need more than SMALL (whole keyword sets)
    "gpt_neo": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                    attention_types=[[["global", "local"], 1]], max_position_embeddings=64),
    "llama4_text": dict(hidden_size=32, intermediate_size=48, intermediate_size_mlp=48,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=8, num_local_experts=4,
                        layer_types=["chunked_attention", "full_attention"],
                        no_rope_layers=[1, 0], moe_layers=[0, 1]),
    "deepseek_v3": dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                        n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                        q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
                        v_head_dim=8, head_dim=4, max_position_embeddings=64),
    "jamba": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                  num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4,
                  mamba_expand=2, mamba_dt_rank=4),
}
TYPES = ["gpt2", "gpt_neox", "gptj", "gpt_neo", "opt", "bloom", "falcon", "falcon_h1", "phi",
         "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
         "gemma3_text", "recurrent_gemma", "mistral", "mixtral", "llama", "llama4_text",
         "stablelm", "olmo", "olmo2", "olmoe", "starcoder2", "gpt_bigcode", "codegen", "mpt",
         "granite", "granitemoe", "cohere", "deepseek_v3", "smollm3", "biogpt", "nemotron",
         "glm", "glm4", "helium", "arcee", "exaone4", "ernie4_5", "gpt_oss", "jamba",
         "bitnet", "seed_oss", "minimax", "hunyuan_v1_dense"]


def _config(model_type: str, tokenizer) -> object:
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if model_type in OWN:
        return AutoConfig.for_model(model_type, **OWN[model_type], **ids)
    cfg = AutoConfig.for_model(model_type)
    for key, value in {**SMALL, **ids}.items():
        if hasattr(cfg, key) or key in ids:
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(cfg, key, value)  # a read-only or derived field keeps its own
    kinds = getattr(cfg, "layer_types", None)
    if isinstance(kinds, list):
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            cfg.layer_types = kinds[:cfg.num_hidden_layers]
    return cfg


def _canonical_grad(layer) -> torch.Tensor:
    """The autograd gradient of the layer's W̄ in the canonical (P, M[+1]) orientation."""
    if layer.kind == "expert":
        g = getattr(layer.module, layer.param).grad[layer.expert]
        return g.t() if layer.transposed else g
    w = layer.module.weight.grad
    w = w if layer.kind == "linear" else w.t()
    return torch.cat([w, layer.module.bias.grad[:, None]], 1) if layer.has_bias else w


def _batch(seqs: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "index": torch.arange(len(seqs))}


def check(model_type: str, tokenizer, folder: str) -> str:
    """One row: build, save, load, compare gradients with autograd, fit and score."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(model_type, tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, tok = load_model(folder, dtype="float64")
    layers = default_layers(model)
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:5]]
    batches = [_batch(seqs[:3], tok.pad_token_id), _batch(seqs[3:], tok.pad_token_id)]
    task = CausalLMTask()
    got = collect_gradients(model, task, batches, layers, objective="loglik")
    for module in model.modules():  # the reference backward needs the float64 expert loop
        if hasattr(getattr(module, "config", None), "_experts_implementation"):
            module.config._experts_implementation = "eager"
    model.zero_grad()
    for b in batches:
        task.loss(model, b).sum().backward()
    err = max(float((got[ly.name].sum(0) + _canonical_grad(ly)).abs().max()
                    / _canonical_grad(ly).abs().max().clamp_min(1e-300)) for ly in layers)
    curvature = fit_curvature(model, task, batches, layers, FitConfig(), progress=False)
    scores = pairwise_scores(model, task, curvature, [_batch([seqs[1]], tok.pad_token_id)],
                             batches, progress=False)
    share = (sum(ly.out_features * (ly.in_features + ly.has_bias) for ly in layers)
             / sum(p.numel() for p in model.parameters()))
    kinds = "+".join(sorted({ly.kind for ly in layers}))
    return (f"{len(layers):3d} {kinds:14s} {share:5.2f} {err:8.1e} "
            f"{bool(torch.isfinite(scores.total).all())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", default=TYPES, help="transformers model types")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DATASLEUTH_PROGRESS", "0")
    warnings.filterwarnings("ignore")
    tokenizer = build_tokenizer(TEXTS, vocab_size=300)
    print(f"{'type':18s} layers kinds         share  grad err finite")
    with tempfile.TemporaryDirectory() as root:
        for model_type in args.types:
            try:
                row = check(model_type, tokenizer, os.path.join(root, model_type))
            except Exception as e:  # report and go on: one row per architecture
                row = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            print(f"{model_type:18s} {row}", flush=True)


if __name__ == "__main__":
    main()
