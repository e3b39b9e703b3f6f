"""The model output a task's loss is computed from (docs/method.md §1, §7).

The Gauss-Newton matrix G = (1/N) Σ_n J_nᵀ H_n J_n and the PBRF need a task's loss as
a function of the network output z: :class:`OutputTask`. A task provides it by
implementing the three methods itself (``datasleuth.lm``'s ``CausalLMTask`` does), or
:func:`output_adapter` supplies them for :class:`~datasleuth.task.ClassificationTask`
and :class:`~datasleuth.task.RegressionTask`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch.nn.functional as F
from torch import Tensor, nn

from datasleuth.errors import DatasleuthError
from datasleuth.task import ClassificationTask, RegressionTask, Task

__all__ = ["OutputTask", "categorical_kl", "categorical_nll", "output_adapter"]

# The methods that define a task's likelihood: output methods written for a class stop
# describing its loss once a subclass (or a mixin ahead of it) redefines one of these.
LIKELIHOOD_METHODS = ("loss", "sampled_loss")


@runtime_checkable
class OutputTask(Protocol):
    """What the Gauss-Newton matrix and the PBRF need beyond :class:`~datasleuth.task.Task`.

    * ``output(model, batch)``: the network output z the loss is computed from (logits,
      predictions), shape (B, ...); examples must not interact.
    * ``loss_from_output(output, batch)``: L per example, (B,), with
      ``loss(model, batch) == loss_from_output(output(model, batch), batch)``.
    * ``output_divergence(output, reference, batch)``: KL(p(·|reference) ‖ p(·|output))
      per example, (B,), summed like the loss. For a matching loss (softmax +
      cross-entropy, Gaussian + squared error) its Hessian in ``output`` at
      ``output == reference`` is H_n, the Hessian of the loss (Bae et al. 2022, §3).

    The three methods must be defined in the same class as ``loss`` and
    ``sampled_loss`` or below it: :func:`output_adapter` refuses a task whose class
    redefines the loss beneath its output methods.
    """

    def output(self, model: nn.Module, batch: Any) -> Tensor: ...

    def loss_from_output(self, output: Tensor, batch: Any) -> Tensor: ...

    def output_divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor: ...


def categorical_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """−log softmax(logits)[target] over the last axis, (...).

    Written with ``gather`` rather than ``F.cross_entropy``: the same number, but
    ``torch.func`` batches its second derivatives about ten times faster.
    """
    return -F.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def categorical_kl(output: Tensor, reference: Tensor) -> Tensor:
    """KL(softmax(reference) ‖ softmax(output)) over the last axis, (...)."""
    log_ref = F.log_softmax(reference, dim=-1)
    return (log_ref.exp() * (log_ref - F.log_softmax(output, dim=-1))).sum(-1)


class _ClassificationOutputs:
    """Outputs of :class:`ClassificationTask`: logits (B, C), softmax cross-entropy."""

    def output(self, model: nn.Module, batch: Any) -> Tensor:
        return model(batch[0])

    def loss_from_output(self, output: Tensor, batch: Any) -> Tensor:
        return categorical_nll(output, batch[1])

    def output_divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor:
        return categorical_kl(output, reference)


class _RegressionOutputs:
    """Outputs of :class:`RegressionTask`: ½‖z − y‖², Gaussian KL ½‖z − z_s‖²."""

    def output(self, model: nn.Module, batch: Any) -> Tensor:
        return model(batch[0])

    def loss_from_output(self, output: Tensor, batch: Any) -> Tensor:
        y = batch[1].reshape(output.shape)
        return 0.5 * (output - y).pow(2).reshape(output.shape[0], -1).sum(1)

    def output_divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor:
        return 0.5 * (output - reference).pow(2).reshape(output.shape[0], -1).sum(1)


_BUILT_IN: tuple[tuple[type[Task], type], ...] = (
    (ClassificationTask, _ClassificationOutputs),
    (RegressionTask, _RegressionOutputs),
)
_METHODS = ("output(model, batch), loss_from_output(output, batch) and "
            "output_divergence(output, reference, batch)")
_SEE = "(see datasleuth.estimators.OutputTask)"


def _defining_class(cls: type, method: str) -> type | None:
    """The first class in ``cls``'s method resolution order that defines ``method``."""
    return next((c for c in cls.__mro__ if method in vars(c)), None)


def _redefined_below(cls: type, owner: type) -> list[str]:
    """The likelihood methods ``cls`` takes from a class ahead of ``owner`` in its MRO."""
    mro = cls.__mro__
    return [m for m in LIKELIHOOD_METHODS
            if (c := _defining_class(cls, m)) is not None and mro.index(c) < mro.index(owner)]


def output_adapter(task: Task) -> OutputTask:
    """``task`` itself if it implements :class:`OutputTask`, else a built-in adapter.

    Built-in adapters exist for :class:`ClassificationTask`, :class:`RegressionTask` and
    their subclasses that keep the base class's loss. Either way the output methods
    must describe the task's loss: a class that redefines ``loss`` or ``sampled_loss``
    after (below, or in a mixin ahead of) the class holding its output methods is
    refused, since its loss would no longer match them.
    """
    if isinstance(task, OutputTask):
        adapter: OutputTask = task
        owner = _defining_class(type(task), "loss_from_output") or type(task)
    else:
        found = next(((base, make) for base, make in _BUILT_IN if isinstance(task, base)), None)
        if found is None:
            raise DatasleuthError(f"{type(task).__name__} does not expose its model output; "
                                  f"add the methods {_METHODS} {_SEE}")
        owner, adapter = found[0], found[1]()
    stale = _redefined_below(type(task), owner)
    if stale:
        name = type(task).__name__
        raise DatasleuthError(
            f"{name} redefines {' and '.join(stale)} below {owner.__name__}, whose output "
            f"methods no longer match that loss; define {_METHODS} in {name} too {_SEE}"
        )
    return adapter
