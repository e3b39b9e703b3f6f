"""The cheap answers influence is compared with, in the interface of the influence scores.

Each baseline gives a :class:`~datasleuth.scoring.Scores` of (Q, N) scores, higher =
more relevant to the query, like :func:`~datasleuth.scoring.pairwise_scores`:

* **Gradient dot product** ⟨∇f_q, ∇log p(z_m)⟩ (TracIn-style, docs/method.md §7): the
  identity curvature, ``fit_curvature(..., config=FitConfig(curvature="identity"))``
  (Λ = 0, λ = 1; no pass over the data), scored by ``pairwise_scores``.
* **Unit-normalised gradients** (TrackStar, Chang et al. 2024): the cosine
  ⟨∇f_q, ∇log p(z_m)⟩ / (‖∇f_q‖ ‖∇log p(z_m)‖). The norm is **global over the tracked
  layers** — the gradient over all tracked parameters is one vector, as in TrackStar —
  and layer ℓ's share ⟨·,·⟩_ℓ / (‖·‖ ‖·‖) is its per-layer score, so the shares sum to
  the cosine. The training side's norm is accumulated layer by layer in the same
  streaming pass (:class:`CosineScorers`). TrackStar also projects the gradients and
  rescales them by the optimizer's second moments; neither is done here.
* **Representation similarity** (Li et al. 2024, "Do Influence Functions Work on Large
  Language Models?", who found it hard to beat): the cosine of per-example
  representations, here the mean over real positions (``task.mask``) of a chosen
  module's input (:func:`module_input_representation`; for a language model, the
  input of the unembedding, i.e. the last hidden state — see :mod:`datasleuth.lm.methods`).
* **BM25** over token ids (docs/method.md §5) as a ranking in its own right
  (:func:`bm25_scores`).

A zero vector (a gradient or representation that is exactly zero) has no direction:
its cosines are defined as 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from datasleuth.errors import DatasleuthError
from datasleuth.layers import TrackedLayer, layers_by_name, per_example_gradients, resolve_layers
from datasleuth.progress import progress_bar
from datasleuth.scoring import LayerScorer, Scores, collect_gradients, scan
from datasleuth.streaming import evaluation
from datasleuth.task import Task
from datasleuth.utils import to_device

__all__ = [
    "CosineScorers",
    "Representation",
    "bm25_scores",
    "collect_representations",
    "cosine_matrix",
    "gradient_cosine_scores",
    "gradient_norms",
    "module_input_representation",
    "module_inputs",
    "representation_scan",
    "representation_scores",
    "unit_rows",
]

Representation = Callable[[nn.Module, Any], Tensor]
"""A per-example representation of a batch: ``represent(model, batch) -> (B, D)``."""


def unit_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` (R, D) scaled to unit norm; zero rows stay zero."""
    norm = x.norm(dim=1, keepdim=True)  # (R, 1)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, 1.0), 0.0)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every row of ``a`` (Q, D) with every row of ``b`` (N, D): (Q, N)."""
    return unit_rows(a) @ unit_rows(b).t()


# --------------------------------------------------------------------- unit-normalised gradients


class _NormScorer:
    """One layer's ⟨q̂, DW̄⟩ (B, Q), recording each example's ‖DW̄_ℓ‖² for its parent."""

    def __init__(self, name: str, unit: Tensor, parent: CosineScorers):
        self.name, self.parent = name, parent
        self.flat = unit.reshape(unit.shape[0], -1)  # (Q, P(M+1))

    def __call__(self, a: Tensor, g: Tensor) -> Tensor:
        if self.flat.dtype != a.dtype or self.flat.device != a.device:
            self.flat = self.flat.to(a.device, a.dtype)
        dw = per_example_gradients(a, g).reshape(a.shape[0], -1)  # (B, P(M+1)), ∇log p
        self.parent.squares[self.name] = dw.square().sum(1)  # (B,)
        return dw @ self.flat.t()  # (B, Q)


class CosineScorers:
    """TrackStar's unit-normalised gradient scores over the tracked layers (module doc).

    ``query_grads`` {layer: (Q, P, M+1)} are divided by their global norm here
    (:attr:`unit`); :attr:`scorers` plug into :func:`~datasleuth.scoring.scan` and record
    the training side's squared norm per layer; :meth:`normalise` then divides a batch's
    (B, Q, L) per-layer dots by each example's global norm. :meth:`scan` does both.
    """

    def __init__(self, query_grads: Mapping[str, Tensor]):
        if not query_grads:
            raise DatasleuthError("no query gradients to normalise; track at least one layer")
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in query_grads.values()], 1)
        norm = flat.norm(dim=1)  # (Q,) over all tracked layers
        scale = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0)
        self.squares: dict[str, Tensor] = {}
        self.unit = {name: g * scale.reshape(-1, *([1] * (g.dim() - 1)))
                     for name, g in query_grads.items()}  # {layer: (Q, P, M+1)}
        self.scorers: dict[str, LayerScorer] = {
            name: _NormScorer(name, u, self) for name, u in self.unit.items()}

    def normalise(self, per_layer: Tensor) -> Tensor:
        """(B, Q, L) per-layer dots of one batch divided by each example's global norm."""
        squares = torch.stack([self.squares.pop(name) for name in self.scorers], 0)  # (L, B)
        norm = squares.sum(0).sqrt()  # (B,)
        scale = torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0)
        return per_layer * scale.to(per_layer.dtype)[:, None, None]

    def scan(self, model: nn.Module, task: Task, train: Iterable[Any],
             on_scores: Callable[[int, Tensor], None], progress: bool = True) -> None:
        """:func:`~datasleuth.scoring.scan` of ``train``: ``on_scores(first, (B, Q, L))``
        gets each layer's share of the cosine (the shares sum to it)."""
        scan(model, task, train, self.scorers,
             lambda first, s: on_scores(first, self.normalise(s)), progress, desc="cosine")


def gradient_cosine_scores(
    model: nn.Module,
    task: Task,
    queries: Iterable[Any],
    train: Iterable[Any],
    layers: Sequence[str] | Sequence[TrackedLayer] | None = None,
    progress: bool = True,
) -> Scores:
    """Cosine of query and training gradients over the tracked layers: total (Q, N),
    per layer (Q, N, L) summing to it (TrackStar's unit normalisation, module doc)."""
    tracked = resolve_layers(model, layers)
    grads = collect_gradients(model, task, queries, tracked, "measurement", progress)
    parts: list[Tensor] = []
    CosineScorers(grads).scan(model, task, train, lambda _, s: parts.append(s.cpu()), progress)
    if not parts:
        raise DatasleuthError("the training loader yielded no batches; give a non-empty dataset")
    per_layer = torch.cat(parts).permute(1, 0, 2).contiguous()  # (Q, N, L)
    return Scores(per_layer.sum(-1), per_layer, [layer.name for layer in tracked])


def gradient_norms(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    layers: Sequence[str],
    progress: bool = False,
) -> Tensor:
    """‖∇θ log p(z)‖ over the tracked layers for every example of ``loader``: (N,)."""
    tracked = layers_by_name(model, list(layers))
    square = {layer.name: _squared_norm for layer in tracked}
    parts = collect_gradients(model, task, loader, tracked, "loglik", progress, features=square)
    return torch.stack(list(parts.values()), 0).sum(0).sqrt()


def _squared_norm(a: Tensor, g: Tensor) -> Tensor:
    return per_example_gradients(a, g).square().sum((1, 2))  # (B,)


# ------------------------------------------------------------------ representation similarity


def module_inputs(task: Task, module: nn.Module) -> Callable[[nn.Module, Any],
                                                              tuple[Tensor, Tensor]]:
    """``inputs(model, batch) -> (x (B, T, D), real (B, T))``: ``module``'s input at every
    position and which positions are real (``task.mask``; all, without one). The model
    runs forward through ``task.loss``; an input of shape (B, D) counts as T = 1."""

    def inputs(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        seen: list[Tensor] = []
        handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            task.loss(model, batch)
        finally:
            handle.remove()
        if not seen:
            raise DatasleuthError("the representation module took no part in the forward pass; "
                                  "choose a module the model calls")
        x = seen[-1].detach()
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, D)
        mask = task.mask(batch) if x.shape[1] > 1 else None
        real = (torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None
                else mask.reshape(x.shape[0], -1).to(x.device).bool())  # (B, T)
        return x, real

    return inputs


def module_input_representation(task: Task, module: nn.Module) -> Representation:
    """The mean over real positions of ``module``'s input: (B, D) (:func:`module_inputs`)."""
    inputs = module_inputs(task, module)

    def represent(model: nn.Module, batch: Any) -> Tensor:
        x, real = inputs(model, batch)
        keep = real.to(x.dtype)  # (B, T)
        return (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1.0)

    return represent


def collect_representations(
    model: nn.Module,
    loader: Iterable[Any],
    represent: Representation,
    progress: bool = False,
) -> Tensor:
    """Every example's representation (N, D), in eval mode and without gradients."""
    parts: list[Tensor] = []
    representation_scan(model, loader, represent, None, lambda _, r: parts.append(r),
                        progress)
    if not parts:
        raise DatasleuthError("the loader yielded no batches; give at least one example")
    return torch.cat(parts)


def representation_scan(
    model: nn.Module,
    loader: Iterable[Any],
    represent: Representation,
    queries: Tensor | None,
    on_scores: Callable[[int, Tensor], None],
    progress: bool = True,
) -> None:
    """Stream ``loader`` once in eval mode, without gradients; ``on_scores(first, (B, Q, 1))``
    gets each batch's cosines with the query representations ``queries`` (Q, D) (with
    ``queries=None``: the batch's own representations (B, D), float64 on the CPU)."""
    device = next(model.parameters()).device
    unit = unit_rows(queries.double()) if queries is not None else None
    first = 0
    with evaluation(model), torch.no_grad():
        for batch in progress_bar(loader, desc="representations", enabled=progress):
            r = represent(model, to_device(batch, device)).double().cpu()  # (B, D)
            on_scores(first, r if unit is None else (unit_rows(r) @ unit.t())[..., None])
            first += r.shape[0]


def representation_scores(
    model: nn.Module,
    represent: Representation,
    queries: Iterable[Any],
    train: Iterable[Any],
    progress: bool = True,
) -> Scores:
    """Cosine similarity of query and training representations: total (Q, N)."""
    q = collect_representations(model, queries, represent, progress)
    parts: list[Tensor] = []
    representation_scan(model, train, represent, q, lambda _, s: parts.append(s), progress)
    if not parts:
        raise DatasleuthError("the training loader yielded no batches; give a non-empty dataset")
    per_layer = torch.cat(parts).permute(1, 0, 2).contiguous()  # (Q, N, 1)
    return Scores(per_layer[..., 0], per_layer, ["representation"])


# ----------------------------------------------------------------------------------- BM25


def bm25_scores(
    query_tokens: Sequence[Sequence[int] | np.ndarray],
    train_tokens: Iterable[Sequence[int] | np.ndarray],
    ignore_ids: Iterable[int] = (),
) -> Scores:
    """BM25 (docs/method.md §5: binary presence, k1 = 1.5, b = 0) of every training
    sequence for every query's tokens: total (Q, N)."""
    from datasleuth.scale.bm25 import CandidateFilter

    index = CandidateFilter.build(train_tokens, ignore_ids=ignore_ids)
    total = torch.stack([torch.as_tensor(index.scores(np.asarray(q, dtype=np.int64)),
                                         dtype=torch.float64) for q in query_tokens])  # (Q, N)
    return Scores(total, total[..., None], ["bm25"])
