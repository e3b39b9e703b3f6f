"""Bare-bones references the engine is tested against (STYLE.md §2-3), float64 only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import hessian, jacrev

from datasleuth.layers import TrackedLayer


def layer_params(layer: TrackedLayer, wbar: Tensor) -> dict[str, Tensor]:
    """Module parameters of ``layer`` built from a canonical (P, M[+1]) matrix."""
    parts = layer.weight_gradient(wbar)  # same split/transposition as for gradients
    return {f"{layer.name}.{k}": v for k, v in parts.items()}


def loop_gradients(
    model: nn.Module,
    layers: Sequence[TrackedLayer],
    examples: Sequence[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
) -> dict[str, Tensor]:
    """Per-example canonical gradients by one backward pass per example: {name: (N,P,M+1)}."""
    out: dict[str, list[Tensor]] = {layer.name: [] for layer in layers}
    for ex in examples:
        model.zero_grad()
        loss_fn(model, ex).backward()
        for layer in layers:
            w = layer.module.weight.grad
            w = w if layer.kind == "linear" else w.t()
            if layer.has_bias:
                w = torch.cat([w, layer.module.bias.grad[:, None]], dim=1)
            out[layer.name].append(w.detach().clone())
    model.zero_grad()
    return {k: torch.stack(v) for k, v in out.items()}


def dense_ggn(
    model: nn.Module,
    layer: TrackedLayer,
    examples: Sequence[Any],
    output_fn: Callable[[nn.Module, dict[str, Tensor], Any], Tensor],
    loss_of_output: Callable[[Tensor, Any], Tensor],
) -> Tensor:
    """G_ℓ = (1/N) Σ_n J_nᵀ H_n J_n for the canonical parameters of one layer, (D, D).

    J_n = ∂ output_n / ∂ vec(W̄) (row-major), H_n = ∂² loss / ∂ output², built with torch.func.
    """
    w0 = layer.canonical_weight().detach()
    d = w0.numel()
    g = torch.zeros(d, d, dtype=torch.float64)
    for ex in examples:
        def out_of(w: Tensor, ex: Any = ex) -> Tensor:
            return output_fn(model, layer_params(layer, w), ex)

        out = out_of(w0).detach()
        j = jacrev(out_of)(w0).reshape(out.numel(), d)
        h = hessian(lambda o, ex=ex: loss_of_output(o, ex))(out).reshape(out.numel(), -1)
        g += (j.t() @ h @ j).detach()
    return g / len(examples)


def dense_influence(
    query_grads: dict[str, Tensor],
    train_grads: dict[str, Tensor],
    ggn: dict[str, Tensor],
    damping: dict[str, float],
) -> Tensor:
    """Σ_ℓ ∇f_ℓᵀ (G_ℓ + λ_ℓ I)⁻¹ (−∇L_ℓ): (Q, N), block-diagonal over layers."""
    total = 0
    for name, g in ggn.items():
        q = query_grads[name].reshape(query_grads[name].shape[0], -1)
        t = train_grads[name].reshape(train_grads[name].shape[0], -1)
        inv = torch.linalg.inv(g + damping[name] * torch.eye(g.shape[0], dtype=g.dtype))
        total = total + q @ inv @ (-t).t()
    return total
