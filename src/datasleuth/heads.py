"""Attention influence per head: a layer's score split over its heads (docs/method.md §6).

For an attention projection the layer's score is an inner product over the coordinates
of its gradient, ⟨Ṽ, DW̄⟩ with Ṽ = (G_ℓ + λ_ℓ I)⁻¹ ∇f the preconditioned query gradient
(P, M+1). The coordinates of one head are

* the rows of its output features for the input projections (q/k/v: ``q_proj``,
  ``k_proj``, ``v_proj``; GPT-2's fused ``c_attn`` gives head h its rows in each of the
  q, k and v sections), and
* the columns of its input features for the output projection (``o_proj``, GPT-2's
  ``attn.c_proj``); the bias column, shared by all heads, is its own group ``"bias"``.

Head h's contribution is ⟨Ṽ, DW̄⟩ restricted to those coordinates, so the groups sum to
the layer's score exactly. The approximation: Ṽ is preconditioned with the layer's
whole EK-FAC curvature, which couples heads; a head's share is not the influence of
that head's weights under a per-head curvature. Fitting with ``FitConfig(blocks=H)``
makes the output-side factor block-diagonal per head for q/k/v projections (blocks of
equal size), which removes the coupling on that side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from datasleuth.layers import TrackedLayer, layers_by_name, per_example_gradients
from datasleuth.streaming import stream
from datasleuth.task import Task

__all__ = ["HeadSplit", "attention_heads", "head_scores", "sequence_head_scores"]


@dataclass(frozen=True)
class HeadSplit:
    """The coordinates of each head in a layer's (P, M+1) gradient."""

    side: str  # "out": rows (q/k/v projections); "in": columns (output projection)
    labels: list[str]  # "h0", "h1", ... (and "bias" for an output projection's bias)
    index: list[Tensor]  # per group, the rows or columns it owns


def _head_counts(model: nn.Module) -> tuple[int, int, int] | None:
    """(heads, key/value heads, head dim) from a transformers config, else None."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, int(kv), int(dim)


def _split(layer: TrackedLayer, heads: int, kv: int, dim: int) -> HeadSplit | None:
    name = layer.name
    labels = [f"h{h}" for h in range(heads)]
    blocks = [torch.arange(h * dim, (h + 1) * dim) for h in range(heads)]
    if name.endswith("attn.c_attn") and layer.out_features == 3 * heads * dim:
        width = heads * dim
        index = [torch.cat([b + s * width for s in range(3)]) for b in blocks]
        return HeadSplit("out", labels, index)
    if name.endswith("attn.q_proj") and layer.out_features == heads * dim:
        return HeadSplit("out", labels, blocks)
    if name.endswith(("attn.k_proj", "attn.v_proj")) and layer.out_features == kv * dim:
        return HeadSplit("out", [f"kv{h}" for h in range(kv)],
                         [torch.arange(h * dim, (h + 1) * dim) for h in range(kv)])
    if name.endswith(("attn.o_proj", "attn.c_proj")) and layer.in_features == heads * dim:
        if layer.has_bias:
            return HeadSplit("in", labels + ["bias"], blocks + [torch.tensor([heads * dim])])
        return HeadSplit("in", labels, blocks)
    return None


def attention_heads(model: nn.Module, names: Iterable[str]) -> dict[str, HeadSplit]:
    """The head splits of those named layers that are attention projections."""
    counts = _head_counts(model)
    if counts is None:
        return {}
    splits = {}
    for layer in layers_by_name(model, list(names)):
        split = _split(layer, *counts) if layer.kind != "expert" else None
        if split is not None:
            splits[layer.name] = split
    return splits


def head_scores(pre: Tensor, grads: Tensor, split: HeadSplit) -> Tensor:
    """Per-head shares of ⟨Ṽ_q, DW̄_n⟩: (Q, P, M+1), (N, P, M+1) -> (N, Q, H)."""
    dim = -2 if split.side == "out" else -1
    pre = pre.to(grads.dtype)
    parts = []
    for idx in split.index:
        idx = idx.to(grads.device)
        v, g = pre.index_select(dim, idx), grads.index_select(dim, idx)
        parts.append(torch.einsum("qpm,npm->nq", v, g))
    return torch.stack(parts, -1)


def sequence_head_scores(
    model: nn.Module,
    task: Task,
    preconditioned: Mapping[str, Tensor],
    loader: Iterable[Any],
    splits: Mapping[str, HeadSplit],
) -> dict[str, Tensor]:
    """Per-head scores {layer: (N, Q, H)} of the loader's sequences (log-likelihood)."""
    layers = layers_by_name(model, list(splits))
    out: dict[str, list[Tensor]] = {layer.name: [] for layer in layers}

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        dw = per_example_gradients(a, g)  # (B, P, M+1)
        pre = preconditioned[layer.name].to(dw.device)
        out[layer.name].append(head_scores(pre, dw, splits[layer.name]).cpu())

    stream(model, task, loader, layers, on_layer, desc="head scores")
    return {name: torch.cat(parts) for name, parts in out.items() if parts}
