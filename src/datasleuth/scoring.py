"""Influence scores: pairwise (queries × training examples), self-influence, per layer.

Sign and scale (METHOD.md §1; Grosse et al. 2023, Eq. 25):

    score(q, m) = ∇θ f_q(θs)ᵀ (G + λI)⁻¹ ∇θ [−L(z_m, θs)]

summed over tracked layers (block-diagonal G). A positive score means that adding z_m
to the training set raises the measurement f_q; scores are **not** divided by the
number of training examples N (the first-order change of f_q from adding z_m to a
mean-loss objective over N examples is score / N). Self-influence is
∇Lᵀ (G + λI)⁻¹ ∇L, the diagonal of the pairwise matrix when each query is a training
example measured by its own log-likelihood f = −L.

Order of work: each query gradient is preconditioned once; training examples are then
streamed batch by batch, their per-example layer gradients DW̄ = Σ_t Ds_t ā_tᵀ formed
from captured activations and output gradients (no weight gradient is ever computed),
scored and dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.layers import (
    TrackedLayer,
    backward_to_outputs,
    capture,
    layers_by_name,
    per_example_gradients,
)
from datasleuth.progress import progress_bar
from datasleuth.task import Task
from datasleuth.utils import compute_dtype, to_device

__all__ = [
    "Preconditioner",
    "Scores",
    "collect_gradients",
    "precondition_queries",
    "scan_scores",
    "pairwise_scores",
    "self_influence",
    "token_scores",
    "top_k",
]


@dataclass
class Scores:
    """Influence scores with their per-layer breakdown.

    ``total`` is (Q, N) for pairwise scores or (N,) for self-influence; ``per_layer``
    adds a trailing layer axis of length ``len(layer_names)`` and sums to ``total``.
    Self-influence also keeps each example's training ``loss`` (N,), computed by the
    same forward pass: the simpler baseline it is compared with.
    """

    total: Tensor
    per_layer: Tensor
    layer_names: list[str]
    loss: Tensor | None = None


class Preconditioner(Protocol):
    """What scoring needs from a curvature estimate: any object with these members.

    :class:`~datasleuth.curvature.Curvature` (identity, diagonal, K-FAC, EK-FAC) is one;
    the reference estimators in :mod:`datasleuth.estimators` are others.
    """

    kind: str

    @property
    def layer_names(self) -> list[str]: ...

    def precondition(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """(G + λI)⁻¹ applied to per-example layer gradients {name: (B, P, M+1)}."""
        ...

    def to(self, device: torch.device | str) -> Preconditioner: ...


def _layers(model: nn.Module, curvature: Preconditioner) -> list[TrackedLayer]:
    return layers_by_name(model, curvature.layer_names)


def _stream(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    layers: list[TrackedLayer],
    on_layer: Callable[[TrackedLayer, Tensor, Tensor], None],
    on_batch_end: Callable[[int], None],
    objective: str,
    desc: str,
    progress: bool,
    on_values: Callable[[Tensor], None] | None = None,
) -> None:
    """Run forward + output-gradient backward over ``loader``; call back per layer/batch.

    ``on_values`` receives each batch's per-example objective values (detached).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with capture(model, layers, on_layer, dtype=compute_dtype(model)) as state:
            for batch in progress_bar(loader, desc=desc, enabled=progress):
                batch = to_device(batch, device)
                state.set_batch(task.mask(batch))
                if objective == "loss":
                    values = task.loss(model, batch)
                else:
                    values = task.measurement(model, batch)
                backward_to_outputs(values.sum(), state)
                if on_values is not None:
                    on_values(values.detach())
                on_batch_end(values.shape[0])
    finally:
        model.train(was_training)


def collect_gradients(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    layers: list[TrackedLayer],
    objective: str = "measurement",
    progress: bool = False,
) -> dict[str, Tensor]:
    """Per-example layer gradients {name: (N, P, M+1)} of the measurement or the loss.

    Holds every example's gradient: meant for queries (few), not for a training corpus.
    """
    chunks: dict[str, list[Tensor]] = {layer.name: [] for layer in layers}

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        chunks[layer.name].append(per_example_gradients(a, g))

    _stream(model, task, loader, layers, on_layer, lambda n: None, objective,
            "query gradients", progress)
    if not chunks[layers[0].name]:
        raise DatasleuthError("the query loader yielded no batches; give at least one query")
    return {name: torch.cat(c) for name, c in chunks.items()}


def precondition_queries(
    model: nn.Module,
    task: Task,
    curvature: Preconditioner,
    queries: Iterable[Any],
    progress: bool = False,
) -> dict[str, Tensor]:
    """Ṽ_q = (G + λI)⁻¹ ∇f_q per layer: {name: (Q, P, M+1)} (METHOD.md §1, §3)."""
    layers = _layers(model, curvature)
    grads = collect_gradients(model, task, queries, layers, "measurement", progress)
    device = next(model.parameters()).device
    return curvature.to(device).precondition(grads)


def scan_scores(
    model: nn.Module,
    task: Task,
    preconditioned: dict[str, Tensor],
    train: Iterable[Any],
    on_scores: Callable[[int, Tensor], None],
    progress: bool = True,
) -> None:
    """Stream ``train`` and call ``on_scores(first_index, scores (B, Q, L))`` per batch.

    ``first_index`` is the position of the batch's first example in iteration order;
    the layer axis follows the order of ``preconditioned``. Memory is one batch.
    """
    layers = layers_by_name(model, list(preconditioned))
    position = {layer.name: i for i, layer in enumerate(layers)}
    flat = {name: v.reshape(v.shape[0], -1) for name, v in preconditioned.items()}  # (Q, P*M)
    buffer: dict[int, Tensor] = {}
    seen = [0]

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        dw = per_example_gradients(a, g)  # (B, P, M+1), gradient of L
        buffer[position[layer.name]] = -(dw.reshape(dw.shape[0], -1) @ flat[layer.name].t())

    def on_batch_end(n: int) -> None:
        scores = torch.stack([buffer[i] for i in range(len(layers))], dim=-1)  # (B, Q, L)
        buffer.clear()
        on_scores(seen[0], scores)
        seen[0] += n

    _stream(model, task, train, layers, on_layer, on_batch_end, "loss", "scoring", progress)


def pairwise_scores(
    model: nn.Module,
    task: Task,
    curvature: Preconditioner,
    queries: Iterable[Any],
    train: Iterable[Any],
    progress: bool = True,
) -> Scores:
    """Influence of every training example on every query: total (Q, N), per layer (Q, N, L)."""
    pre = precondition_queries(model, task, curvature, queries, progress)
    parts: list[Tensor] = []
    scan_scores(model, task, pre, train, lambda start, s: parts.append(s.cpu()), progress)
    if not parts:
        raise DatasleuthError("the training loader yielded no batches; give a non-empty dataset")
    per_layer = torch.cat(parts).permute(1, 0, 2).contiguous()  # (Q, N, L)
    return Scores(per_layer.sum(-1), per_layer, curvature.layer_names)


def self_influence(
    model: nn.Module,
    task: Task,
    curvature: Preconditioner,
    train: Iterable[Any],
    progress: bool = True,
) -> Scores:
    """∇L(z)ᵀ (G + λI)⁻¹ ∇L(z) for every training example: total (N,), per layer (N, L).

    Block-diagonal curvatures (:class:`Curvature`) take the fast path in their
    eigenbasis; any other preconditioner gets the batch's gradients of all layers at once.
    """
    layers = layers_by_name(model, curvature.layer_names)
    curv = curvature.to(next(model.parameters()).device)
    fast = isinstance(curv, Curvature)
    names = [layer.name for layer in layers]
    buffer: dict[str, Tensor] = {}
    parts: list[Tensor] = []

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        dw = per_example_gradients(a, g)  # (B, P, M+1)
        buffer[layer.name] = curv.layers[layer.name].quadratic(dw) if fast else dw

    def on_batch_end(n: int) -> None:
        if fast:
            per_layer = [buffer[name] for name in names]
        else:
            pre = curv.precondition(buffer)
            per_layer = [(pre[name] * buffer[name]).sum((-2, -1)) for name in names]
        parts.append(torch.stack(per_layer, -1).cpu())
        buffer.clear()

    losses: list[Tensor] = []
    _stream(model, task, train, layers, on_layer, on_batch_end, "loss", "self-influence",
            progress, on_values=lambda v: losses.append(v.cpu()))
    if not parts:
        raise DatasleuthError("the training loader yielded no batches; give a non-empty dataset")
    per_layer = torch.cat(parts)  # (N, L)
    return Scores(per_layer.sum(-1), per_layer, list(names), torch.cat(losses))


def token_scores(
    model: nn.Module,
    task: Task,
    preconditioned: dict[str, Tensor],
    batch: Any,
) -> Tensor:
    """Token-wise influence (METHOD.md §6): (B, Q, T, L) with
    score_{t,ℓ} = −Ds_{ℓ,t}ᵀ Ṽ_ℓ ā_{ℓ,t}; summing over t and ℓ gives the pairwise score.

    Position t pairs the layer input at token t with the gradient of the loss terms that
    depend on it (for a causal LM: predicting token t+1 and later).
    """
    layers = layers_by_name(model, list(preconditioned))
    position = {layer.name: i for i, layer in enumerate(layers)}
    out: dict[int, Tensor] = {}

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        v = preconditioned[layer.name].to(a.dtype)  # (Q, P, M+1)
        va = torch.einsum("qpm,btm->bqtp", v, a)  # Ṽ ā_t, (B, Q, T, P)
        out[position[layer.name]] = -torch.einsum("bqtp,btp->bqt", va, g)

    _stream(model, task, [batch], layers, on_layer, lambda n: None, "loss", "tokens", False)
    return torch.stack([out[i] for i in range(len(layers))], dim=-1)


def top_k(scores: Tensor, k: int = 10, largest: bool = True) -> list[list[tuple[int, float]]]:
    """Per query, the ``k`` (index, score) pairs with the largest (or smallest) scores.

    ``scores`` is (Q, N) or (N,); ties are broken by the lower index.
    """
    s = scores if scores.dim() == 2 else scores[None]
    k = min(k, s.shape[1])
    order = torch.argsort(s if not largest else -s, dim=1, stable=True)[:, :k]
    return [
        [(int(i), float(row[i])) for i in idx]
        for row, idx in zip(s, order)
    ]
