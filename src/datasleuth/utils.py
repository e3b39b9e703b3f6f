"""Small helpers shared by the engine: devices and dtypes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["to_device", "compute_dtype"]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models (tests, references), else float32 (bf16/fp16 promoted)."""
    p = next(model.parameters(), None)
    return torch.float64 if p is not None and p.dtype == torch.float64 else torch.float32
