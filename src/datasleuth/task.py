"""What the engine needs to know about a model and its data: the task.

A task turns a batch into per-example scalars (all of shape (B,)):

* ``loss``: the training loss L(z, θ), **summed** over the tokens/outputs of each example
  (docs/method.md §1: only the sum makes softmax + cross-entropy a matching loss);
* ``sampled_loss``: the same loss with labels ŷ drawn from the model's own predictive
  distribution, whose gradient is the pseudo-gradient of the true Fisher (docs/method.md §3);
* ``measurement``: the query function f(θ), e.g. log p(completion | prompt).

and, optionally, ``mask``: which positions of the layer inputs are real (not padding).
Examples must not interact inside a batch (no batch norm in training mode), so that the
gradient of the batch sum at an example's positions is that example's own gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasleuth.errors import DatasleuthError

__all__ = ["Task", "ClassificationTask", "RegressionTask"]


class Task(ABC):
    """Subclass this for your model: three per-example scalars and an optional mask."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Training loss per example, summed over its tokens/outputs: (B,)."""

    @abstractmethod
    def sampled_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Tensor:
        """Loss per example with labels sampled from the model's predictions: (B,)."""

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        """Query measurement f per example: (B,). Default: the log-likelihood −L."""
        return -self.loss(model, batch)

    def mask(self, batch: Any) -> Tensor | None:
        """(B, T) bool mask of real positions of the layer inputs, or None if all real."""
        return None

    def batch_size(self, batch: Any) -> int:
        """Number of examples in ``batch`` (first dimension of its first tensor)."""
        if isinstance(batch, Tensor):
            return batch.shape[0]
        if isinstance(batch, dict):
            return self.batch_size(next(iter(batch.values())))
        if isinstance(batch, (list, tuple)):
            return self.batch_size(batch[0])
        raise TypeError(f"cannot find the batch size of a {type(batch).__name__}")


_SAMPLE_CHUNK_BYTES = 64 << 20


def _sample_categorical(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One label per row drawn from softmax(logits), on the logits' device (§3).

    Inverse CDF: a uniform u per row from the (CPU) ``generator``, the unnormalised CDF
    C = cumsum exp(x − max x) in float64, and the label i with C_{i−1} ≤ u·C_V < C_i, so
    a token of probability zero is never drawn. Only the uniforms cross devices; the
    float64 CDF is built in row blocks of 64 MiB. (``torch.multinomial`` on CPU
    probabilities cost 9× this at an 8192-token vocabulary, and moved the whole
    (B·T, V) float64 table off the GPU.)
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    n, vocab = flat.shape
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64).to(flat.device)
    draws = torch.empty(n, dtype=torch.long, device=flat.device)
    rows = max(1, _SAMPLE_CHUNK_BYTES // (8 * vocab))
    for lo in range(0, n, rows):
        x = flat[lo : lo + rows].double()  # the logits themselves if already float64
        cdf = (x - x.amax(-1, keepdim=True)).exp_().cumsum_(-1)
        total = cdf[:, -1:]
        if not bool(torch.isfinite(total).all()):  # NaN or +Inf logits: no distribution
            raise DatasleuthError(
                "the model's output logits hold NaN or Inf, so no labels can be sampled for "
                "the Fisher (fisher='sampled'); check the model's weights and inputs (an "
                "overflow in float16/bfloat16 is a common cause) or load it in float32")
        picked = torch.searchsorted(cdf, u[lo : lo + rows].mul_(total), right=True)
        draws[lo : lo + rows] = picked.squeeze(-1).clamp_max_(vocab - 1)
    return draws.reshape(logits.shape[:-1])


class ClassificationTask(Task):
    """Softmax cross-entropy on batches ``(inputs, labels)``; f = log p(label | input)."""

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

    def sampled_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Tensor:
        x, _ = batch
        logits = model(x)
        return F.cross_entropy(logits, _sample_categorical(logits, generator), reduction="none")


class RegressionTask(Task):
    """Squared error ½‖y − model(x)‖² summed over outputs, Gaussian noise of unit variance.

    The Fisher of this Gaussian likelihood equals the Gauss-Newton matrix, so sampled
    labels y ~ N(model(x), I) give its pseudo-gradients.
    """

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        out = model(x)
        return 0.5 * (out - y.reshape(out.shape)).pow(2).reshape(out.shape[0], -1).sum(1)

    def sampled_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Tensor:
        x, _ = batch
        out = model(x)
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        y = out.detach() + noise
        return 0.5 * (out - y).pow(2).reshape(out.shape[0], -1).sum(1)
