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
_CDF_BLOCK = 128  # vocabulary entries per block of the two-level inverse CDF


def _sample_categorical(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One label per row drawn from softmax(logits), on the logits' device (§3).

    Inverse CDF: a uniform u per row from the (CPU) ``generator``, the unnormalised
    probabilities e = exp(x − max x) (float32, float64 for float64 logits), and the label
    i with C_{i−1} ≤ u·C_V < C_i for C = cumsum e, so a token of probability zero is never
    drawn. C is found in two levels (:func:`_draw_rows`): the block of 128 tokens holding
    u·C_V, from running block sums, then the token within it; only the uniforms cross
    devices, in row blocks of 64 MiB. (A float64 CDF of the whole vocabulary cost 6× this
    at 8192 tokens, 47 against 7.6 ms a batch of 8 × 127; ``torch.multinomial`` on CPU
    probabilities about 50×.)
    """
    logits = logits.detach()
    vocab = logits.shape[-1]
    n = logits.numel() // vocab if vocab else 0
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64).to(logits.device)
    draws = torch.empty(n, dtype=torch.long, device=logits.device)
    rows = max(1, _SAMPLE_CHUNK_BYTES // (8 * vocab))
    # a slice such as logits[:, :-1] is read item by item, each a view, not copied whole
    items = [logits.reshape(-1, vocab)] if logits.is_contiguous() or logits.dim() < 3 \
        else [x.reshape(-1, vocab) for x in logits.flatten(0, -3)]
    first = 0
    for flat in items:
        for lo in range(0, flat.shape[0], rows):
            hi = min(lo + rows, flat.shape[0])
            draws[first + lo : first + hi] = _draw_rows(flat[lo:hi], u[first + lo : first + hi])
        first += flat.shape[0]
    return draws.reshape(logits.shape[:-1])


def _draw_rows(x: Tensor, u: Tensor) -> Tensor:
    """Labels (n,) of logits x (n, V) at uniforms u (n, 1): :func:`_sample_categorical`.

    The block is drawn from the block sums (in e's dtype; their float64 running total
    picks it), the token from the fraction of the way into that block, on the block's
    own float64 cumulative sum, so rounding of a block sum cannot shift mass to a token
    of probability zero."""
    n, vocab = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)  # bf16/fp16 logits: x − max x would round to 8 or 11 bits
    width = vocab + (-vocab) % _CDF_BLOCK
    e = torch.full((n, width), -torch.inf, dtype=dtype, device=x.device)
    torch.sub(x, x.amax(-1, keepdim=True), out=e[:, :vocab])
    e = e.exp_().view(n, -1, _CDF_BLOCK)  # (n, blocks, block)
    sums = e.sum(-1).double()  # (n, blocks)
    ends = sums.cumsum(-1)
    total = ends[:, -1:]
    if not bool(torch.isfinite(total).all()):  # NaN or +Inf logits: no distribution
        raise DatasleuthError(
            "the model's output logits hold NaN or Inf, so no labels can be sampled for "
            "the Fisher (fisher='sampled'); check the model's weights and inputs (an "
            "overflow in float16/bfloat16 is a common cause) or load it in float32")
    target = u * total  # (n, 1)
    # past the last block of positive mass only if u·C_V rounded up to C_V: take that block
    last = ends.shape[1] - 1 - (sums.flip(-1) > 0).int().argmax(-1, keepdim=True)
    block = torch.minimum(torch.searchsorted(ends, target, right=True), last)
    mass = sums.gather(1, block)  # > 0: the block holds u·C_V, so it holds probability
    fraction = ((target - ends.gather(1, block) + mass) / mass).clamp_(0, 1 - 2.0**-50)
    inner = e[torch.arange(n, device=x.device), block[:, 0]].double().cumsum_(-1)
    token = torch.searchsorted(inner, fraction * inner[:, -1:], right=True)
    return (block[:, 0] * _CDF_BLOCK + token[:, 0].clamp_max_(_CDF_BLOCK - 1)).clamp_max_(
        vocab - 1)


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
