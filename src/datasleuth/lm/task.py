"""The causal language-model task (docs/method.md §1).

Batches follow docs/CONTRACT.md: ``input_ids``, ``attention_mask`` and HF-aligned
``labels`` (-100 where a position is not scored). The loss of a sequence is
L(z) = −Σ_t log p(z_{t+1} | z_≤t), summed over scored positions; the measurement of a
query is f = log p(completion | prompt), summed over completion tokens only (its
labels are -100 on the prompt). Pseudo-gradients for the true Fisher draw each scored
next token from the model's own softmax.

The task is also an :class:`~datasleuth.estimators.OutputTask` (docs/method.md §1, §7):
its output is the logits, so the exact and iterative estimators and the PBRF use it
as is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasleuth.estimators.outputs import categorical_kl, categorical_nll
from datasleuth.task import Task, _sample_categorical

__all__ = ["CausalLMTask"]


class CausalLMTask(Task):
    """Next-token prediction with summed token losses; padding masked everywhere.

    Its output methods (:class:`~datasleuth.estimators.OutputTask`) describe the loss
    of this class: a subclass that redefines ``loss`` or ``sampled_loss`` must redefine
    them too, or the estimators refuse it; one that only redefines ``logits`` keeps
    them consistent, since loss and output both come from ``logits``.
    """

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits for the next token at every position: (B, T, V).

        A Hugging Face model is asked for no key/value cache: none is reused, and some
        (RecurrentGemma) cannot build one for a plain forward pass."""
        config = getattr(model, "config", None)
        extra = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    **extra)
        return out.logits if hasattr(out, "logits") else out

    @staticmethod
    def _token_nll(logits: Tensor, targets: Tensor) -> Tensor:
        """Σ_t −log p(target_{t+1} | ≤t) per sequence; targets -100 are skipped. (B,)

        The targets are shifted, not the logits (the last position gets -100), so neither
        a copy of the logits nor, in the backward pass, a zero-filled one is made."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        tgt = F.pad(targets[:, 1:], (0, 1), value=-100)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                              ignore_index=-100, reduction="none")
        return nll.reshape(tgt.shape).sum(1)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        return self._token_nll(self.logits(model, batch), batch["labels"])

    def sampled_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> Tensor:
        logits = self.logits(model, batch)
        sampled = torch.full_like(batch["labels"], -100)
        draws = _sample_categorical(logits[:, :-1], generator)  # (B, T-1)
        keep = batch["labels"][:, 1:] != -100
        sampled[:, 1:] = torch.where(keep, draws, sampled[:, 1:])
        return self._token_nll(logits, sampled)

    def measurement(self, model: nn.Module, batch: Any) -> Tensor:
        return -self.loss(model, batch)

    def mask(self, batch: Any) -> Tensor | None:
        return batch["attention_mask"].bool()

    def output(self, model: nn.Module, batch: Any) -> Tensor:
        """The logits (B, T, V) the loss is computed from."""
        return self.logits(model, batch)

    def loss_from_output(self, output: Tensor, batch: Any) -> Tensor:
        """Σ_t −log p(labels_{t+1} | ≤t) at the scored positions, from logits: (B,)."""
        targets = batch["labels"][:, 1:]  # HF-aligned: logits[t] predicts labels[t+1]
        scored = (targets != -100).to(output.dtype)  # (B, T-1)
        nll = categorical_nll(output[:, :-1], targets.clamp_min(0))  # (B, T-1)
        return (nll * scored).sum(1)

    def output_divergence(self, output: Tensor, reference: Tensor, batch: Any) -> Tensor:
        """Σ_t KL(softmax(reference_t) ‖ softmax(output_t)) at the scored positions: (B,)."""
        scored = (batch["labels"][:, 1:] != -100).to(output.dtype)  # (B, T-1)
        kl = categorical_kl(output[:, :-1], reference[:, :-1])  # (B, T-1)
        return (kl * scored).sum(1)
