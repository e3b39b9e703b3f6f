"""Influence scores: pairwise (queries × training examples), self-influence, per layer, per token.

Sign and scale (docs/method.md §1; Grosse et al. 2023, Eq. 25):

    score(q, m) = ∇θ f_q(θs)ᵀ (G + λI)⁻¹ ∇θ log p(z_m; θs),   log p(z_m) = −L(z_m, θs)

summed over tracked layers (block-diagonal G). A positive score means that adding z_m
to the training set raises the measurement f_q; scores are **not** divided by the
number of training examples N (the first-order change of f_q from adding z_m to a
mean-loss objective over N examples is score / N). Self-influence is
∇Lᵀ (G + λI)⁻¹ ∇L, the diagonal of the pairwise matrix when each query is a training
example measured by its own log-likelihood.

Order of work: each query gradient is preconditioned once; training examples are then
streamed (:func:`datasleuth.streaming.stream`, whose captured gradients are those of
the log-likelihood, so a score is a plain inner product) and every tracked layer's
captured (ā, Ds) goes to a per-layer :class:`LayerScorer` — full rank here, low rank
(:mod:`datasleuth.scale.batching`) or projected (:mod:`datasleuth.scale.index`) — that
returns the layer's (B, Q) scores. No weight gradient is ever computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.finite import check_scores
from datasleuth.layers import TrackedLayer, layers_by_name, per_example_gradients
from datasleuth.preconditioner import Preconditioner
from datasleuth.streaming import BatchEnd, stream
from datasleuth.task import Task

__all__ = [
    "Features",
    "FullRankScorer",
    "LayerScorer",
    "Scores",
    "collect_gradients",
    "collect_scores",
    "pairwise_scores",
    "precondition_queries",
    "query_coordinates",
    "scan",
    "scan_scores",
    "self_influence",
    "token_scores",
    "top_k",
]

Features = Callable[[Tensor, Tensor], Tensor]
"""Per-layer gradient features from ā (B,T,M+1) and Ds (B,T,P): (B, ...)."""


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


class LayerScorer(Protocol):
    """Scores one layer's captured (ā, Ds) of a batch against every query."""

    def __call__(self, a: Tensor, g: Tensor) -> Tensor:
        """(B, Q) scores from ā (B, T, M+1) and Ds (B, T, P), padding already zero."""
        ...


class FullRankScorer:
    """⟨Ṽ_q, DW̄⟩ with the full preconditioned query gradients Ṽ (Q, P, M+1) (§1).

    Cost per batch: 2 B T P (M+1) multiply-adds to form DW̄, 2 B Q P (M+1) for the dots.
    """

    def __init__(self, preconditioned: Tensor):
        self.flat = preconditioned.reshape(preconditioned.shape[0], -1)  # (Q, P(M+1))

    def __call__(self, a: Tensor, g: Tensor) -> Tensor:
        if self.flat.dtype != a.dtype or self.flat.device != a.device:
            self.flat = self.flat.to(a.device, a.dtype)
        dw = per_example_gradients(a, g)  # (B, P, M+1), gradient of log p
        return dw.reshape(dw.shape[0], -1) @ self.flat.t()  # (B, Q)


def collect_gradients(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    layers: list[TrackedLayer],
    objective: str = "measurement",
    progress: bool = False,
    features: Mapping[str, Features] | None = None,
) -> dict[str, Tensor]:
    """Per-example layer gradients {name: (N, P, M+1)} of an objective (streaming module).

    ``features`` maps layer names to another per-example feature of (ā, Ds) than the
    gradient DW̄, e.g. an index's projection. Holds every example's result: meant for
    queries (few), not for a training corpus.
    """
    chunks: dict[str, list[Tensor]] = {layer.name: [] for layer in layers}

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        fn = features[layer.name] if features is not None else per_example_gradients
        chunks[layer.name].append(fn(a, g))

    stream(model, task, loader, layers, on_layer, objective=objective,
           desc="query gradients", progress=progress)
    if not chunks[layers[0].name]:
        raise DatasleuthError("the query loader yielded no batches; give at least one query")
    return {name: torch.cat(c) if len(c) > 1 else c[0] for name, c in chunks.items()}


def precondition_queries(
    model: nn.Module,
    task: Task,
    curvature: Preconditioner,
    queries: Iterable[Any],
    progress: bool = False,
    features: Mapping[str, Features] | None = None,
) -> dict[str, Tensor]:
    """Ṽ_q = (G + λI)⁻¹ ∇f_q per layer: {name: (Q, P, M+1)} (docs/method.md §1, §3).

    A block-diagonal :class:`Curvature` preconditions in its eigenbasis
    (:func:`query_coordinates`), so each query's dense P×(M+1) matrix is formed once,
    by the final rotation back. With ``features`` (e.g. an index's projections), the
    query features are preconditioned instead: {name: (Q, D_ℓ)}.
    """
    if isinstance(curvature, Curvature) and features is None:
        coords, curv = query_coordinates(model, task, curvature, queries, progress)
        return {name: curv.layers[name].unrotate(c) for name, c in coords.items()}
    layers = layers_by_name(model, curvature.layer_names)
    grads = collect_gradients(model, task, queries, layers, "measurement", progress, features)
    device = next(model.parameters()).device
    return curvature.to(device).precondition(grads)


def query_coordinates(
    model: nn.Module,
    task: Task,
    curvature: Curvature,
    queries: Iterable[Any],
    progress: bool = False,
) -> tuple[dict[str, Tensor], Curvature]:
    """C_q = (Q_Sᵀ ∇f_q Q_A) ⊘ (Λ + λ), the preconditioned queries in the eigenbasis (§3).

    Returns ({name: (Q, P, M+1)}, the curvature on the model's device); Ṽ_q = Q_S C_q Q_Aᵀ.
    Each query gradient is rotated per token or as a whole, whichever costs less
    (:func:`datasleuth.curvature.rotated_gradients`), and never formed unrotated.
    """
    curv = curvature.to(next(model.parameters()).device)
    layers = layers_by_name(model, curv.layer_names)
    rotate = {name: curv.layers[name].rotated_gradients for name in curv.layer_names}
    rot = collect_gradients(model, task, queries, layers, "measurement", progress, rotate)
    # in place: r is this call's own (Q, P, M+1) tensor, and a second one costs its size
    return {n: r.mul_(curv.layers[n].inverse_eigenvalues(r.dtype)) for n, r in rot.items()
            }, curv


def scan(
    model: nn.Module,
    task: Task,
    train: Iterable[Any],
    scorers: Mapping[str, LayerScorer],
    on_scores: Callable[[int, Tensor], None],
    progress: bool = True,
    desc: str = "scoring",
) -> None:
    """Stream ``train`` once; call ``on_scores(first_index, scores (B, Q, L))`` per batch.

    ``first_index`` is the position of the batch's first example in iteration order;
    the layer axis follows the order of ``scorers``. Memory is one batch.
    """
    layers = layers_by_name(model, list(scorers))
    names = [layer.name for layer in layers]
    buffer: dict[str, Tensor] = {}

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        buffer[layer.name] = scorers[layer.name](a, g)

    def on_batch(end: BatchEnd) -> None:
        batch = torch.stack([buffer.pop(n) for n in names], dim=-1)
        check_scores(batch, names, end.first)  # never a NaN dropped from a top-k unsaid
        on_scores(end.first, batch)

    stream(model, task, train, layers, on_layer, objective="loglik", on_batch=on_batch,
           desc=desc, progress=progress)


def scan_scores(
    model: nn.Module,
    task: Task,
    preconditioned: Mapping[str, Tensor],
    train: Iterable[Any],
    on_scores: Callable[[int, Tensor], None],
    progress: bool = True,
) -> None:
    """:func:`scan` with full-rank preconditioned queries {name: (Q, P, M+1)}."""
    scorers = {name: FullRankScorer(v) for name, v in preconditioned.items()}
    scan(model, task, train, scorers, on_scores, progress)


def collect_scores(
    model: nn.Module,
    task: Task,
    train: Iterable[Any],
    scorers: Mapping[str, LayerScorer],
    progress: bool = True,
    desc: str = "scoring",
) -> Scores:
    """Every score of :func:`scan`, held in memory: total (Q, N), per layer (Q, N, L)."""
    parts: list[Tensor] = []
    scan(model, task, train, scorers, lambda start, s: parts.append(s.cpu()), progress, desc)
    if not parts:
        raise DatasleuthError("the training loader yielded no batches; give a non-empty dataset")
    per_layer = torch.cat(parts).permute(1, 0, 2).contiguous()  # (Q, N, L)
    return Scores(per_layer.sum(-1), per_layer, list(scorers))


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
    scorers = {name: FullRankScorer(v) for name, v in pre.items()}
    scores = collect_scores(model, task, train, scorers, progress)
    scores.layer_names = list(curvature.layer_names)
    return scores


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
    losses: list[Tensor] = []

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        dw = per_example_gradients(a, g)  # (B, P, M+1)
        buffer[layer.name] = curv.layers[layer.name].quadratic(dw) if fast else dw

    def on_batch(end: BatchEnd) -> None:
        if fast:
            per_layer = [buffer[name] for name in names]
        else:
            pre = curv.precondition(buffer)
            per_layer = [(pre[name] * buffer[name]).sum((-2, -1)) for name in names]
        parts.append(torch.stack(per_layer, -1).cpu())
        check_scores(parts[-1], names, end.first, "self-influence scores")
        losses.append(-end.values.cpu())  # the objective is log p = −L
        buffer.clear()

    stream(model, task, train, layers, on_layer, on_batch=on_batch, desc="self-influence",
           progress=progress)
    if not parts:
        raise DatasleuthError("the training loader yielded no batches; give a non-empty dataset")
    per_layer = torch.cat(parts)  # (N, L)
    return Scores(per_layer.sum(-1), per_layer, list(names), torch.cat(losses))


def token_scores(
    model: nn.Module,
    task: Task,
    preconditioned: Mapping[str, Tensor],
    batch: Any,
) -> Tensor:
    """Token-wise influence (docs/method.md §6): (B, Q, T, L) with
    score_{t,ℓ} = Ds_{ℓ,t}ᵀ Ṽ_ℓ ā_{ℓ,t}; summing over t and ℓ gives the pairwise score.

    Ds is the gradient of log p (streaming module). Position t pairs the layer input at
    token t with the gradient of the loss terms that depend on it (for a causal LM:
    predicting token t+1 and later).
    """
    layers = layers_by_name(model, list(preconditioned))
    out: dict[str, Tensor] = {}

    def on_layer(layer: TrackedLayer, a: Tensor, g: Tensor) -> None:
        v = preconditioned[layer.name].to(a.dtype)  # (Q, P, M+1)
        va = torch.einsum("qpm,btm->bqtp", v, a)  # Ṽ ā_t, (B, Q, T, P)
        out[layer.name] = torch.einsum("bqtp,btp->bqt", va, g)

    stream(model, task, [batch], layers, on_layer, desc="tokens")
    return torch.stack([out[layer.name] for layer in layers], dim=-1)


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
