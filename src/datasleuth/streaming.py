"""The one streaming pass under every computation (docs/method.md §1-§3).

Fitting, pairwise and self-influence scoring, the low-rank scan, the index build and
query gradients all run the same loop: the model in eval mode, the tracked layers
captured (:func:`datasleuth.layers.capture`), one objective per batch
back-propagated only as far as the layer outputs, and two callbacks — one per layer
with that layer's homogeneous inputs ā (B, T, M+1) and output gradients Ds (B, T, P),
one per batch with the batch's size, mask and per-example objective values.

One sign convention for every captured gradient: Ds is the gradient of a
**log-likelihood**, never of a loss. The objectives are

* ``"loglik"``: log p(z) = −L(z, θ), the training sequence's own log-likelihood
  (rows of the scan and the index; the empirical Fisher);
* ``"measurement"``: the query's f(θ), e.g. log p(completion | prompt);
* ``"sampled"``: log p(ŷ | x) with labels ŷ drawn from the model (the true Fisher's
  pseudo-gradients, docs/method.md §3).

So the per-example gradient DW̄ = Σ_t Ds_t ā_tᵀ of a training sequence is ∇θ log p(z_m)
and an influence score is a plain inner product ⟨(G + λI)⁻¹∇f, DW̄⟩ with no sign to flip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from datasleuth.errors import DatasleuthError
from datasleuth.fsdp import is_sharded, lockstep
from datasleuth.layers import LayerFn, TrackedLayer, backward_to_outputs, capture, warn_unreached
from datasleuth.progress import progress_bar
from datasleuth.task import Task
from datasleuth.utils import compute_dtype, to_device

__all__ = ["OBJECTIVES", "BatchEnd", "evaluation", "objective_values", "stream"]

OBJECTIVES = ("loglik", "measurement", "sampled")


@dataclass(frozen=True)
class BatchEnd:
    """What the per-batch callback learns once a batch's layers have all been seen."""

    position: int  # the batch's number in the loader (skipped batches counted)
    first: int  # iteration-order index of its first example among the streamed ones
    size: int  # examples in the batch, B
    mask: Tensor | None  # (B, T) real positions of the layer inputs, or None
    values: Tensor  # (B,) the objective per example, detached


@contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block; its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def objective_values(
    task: Task, model: nn.Module, batch: Any, objective: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The per-example objective (B,) whose gradient the pass captures (module docstring)."""
    if objective == "loglik":
        return -task.loss(model, batch)
    if objective == "measurement":
        return task.measurement(model, batch)
    if objective == "sampled":
        if generator is None:
            raise DatasleuthError("the sampled objective needs a torch.Generator for its labels")
        return -task.sampled_loss(model, batch, generator)
    raise DatasleuthError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def stream(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    layers: list[TrackedLayer],
    on_layer: LayerFn,
    *,
    objective: str = "loglik",
    on_batch: Callable[[BatchEnd], None] | None = None,
    generator: torch.Generator | None = None,
    start: int = 0,
    max_batches: int | None = None,
    desc: str = "",
    progress: bool = False,
) -> int:
    """Stream ``loader`` once; return the number of examples streamed.

    ``on_layer(layer, a (B,T,M+1), Ds (B,T,P))`` runs during each batch's backward pass
    (padding already zeroed, dtype float32, float64 for float64 models);
    ``on_batch(BatchEnd)`` after it. Batches before ``start`` (done before a resume) are
    skipped, and the pass stops after ``max_batches`` batches of the loader.
    """
    if objective not in OBJECTIVES:
        raise DatasleuthError(f"unknown objective {objective!r}; choose one of "
                              f"{', '.join(OBJECTIVES)}")
    device = next(model.parameters()).device
    seen = 0
    with evaluation(model), capture(model, layers, on_layer, dtype=compute_dtype(model)) as state:
        numbered = _numbered(progress_bar(loader, desc=desc, enabled=progress), start,
                             max_batches)
        # A sharded model (datasleuth.fsdp) runs as many passes on every process.
        batches = (lockstep(numbered, device) if is_sharded(model)
                   else ((item, True) for item in numbered))
        for (i, batch), real in batches:
            batch = to_device(batch, device)
            mask = task.mask(batch)
            state.set_batch(mask, discard=not real)
            values = objective_values(task, model, batch, objective, generator)
            backward_to_outputs(values.sum(), state)
            if not real:
                continue
            if on_batch is not None:
                on_batch(BatchEnd(i, seen, values.shape[0], mask, values.detach()))
            seen += values.shape[0]
        warn_unreached(state)
    return seen


def _numbered(batches: Iterable[Any], start: int, max_batches: int | None
              ) -> Iterator[tuple[int, Any]]:
    """(position, batch) from ``start`` on, stopping before ``max_batches``."""
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if i >= start:
            yield i, batch
