"""The causal language-model task (METHOD.md §1).

Batches follow docs/CONTRACT.md: ``input_ids``, ``attention_mask`` and HF-aligned
``labels`` (-100 where a position is not scored). The loss of a sequence is
L(z) = −Σ_t log p(z_{t+1} | z_≤t), summed over scored positions; the measurement of a
query is f = log p(completion | prompt), summed over completion tokens only (its
labels are -100 on the prompt). Pseudo-gradients for the true Fisher draw each scored
next token from the model's own softmax.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datasleuth.task import Task, _sample_categorical

__all__ = ["CausalLMTask"]


class CausalLMTask(Task):
    """Next-token prediction with summed token losses; padding masked everywhere."""

    def logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits for the next token at every position: (B, T, V)."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits if hasattr(out, "logits") else out

    @staticmethod
    def _token_nll(logits: Tensor, targets: Tensor) -> Tensor:
        """Σ_t −log p(target_{t+1} | ≤t) per sequence; targets -100 are skipped. (B,)"""
        shifted = logits[:, :-1].float() if logits.dtype in (torch.float16, torch.bfloat16) \
            else logits[:, :-1]
        tgt = targets[:, 1:]
        nll = F.cross_entropy(
            shifted.reshape(-1, shifted.shape[-1]), tgt.reshape(-1), ignore_index=-100,
            reduction="none",
        )
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
