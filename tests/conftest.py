"""Tiny float64 models and data made in the tests (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")
torch.set_default_dtype(torch.float32)
# Tiny models gain nothing from threads; on a shared 2-core machine they only contend.
torch.set_num_threads(1)


@pytest.fixture
def mlp_data():
    """A 2-layer tanh MLP classifier in float64 and 23 examples (no batch size divides 23)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return model, x, y


def loader(x, y, batch_size=5, shuffle_seed=None):
    idx = torch.arange(len(x))
    if shuffle_seed is not None:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(shuffle_seed))
    return DataLoader(TensorDataset(x[idx], y[idx]), batch_size=batch_size)


def tiny_gpt2(vocab: int = 11, seed: int = 0):
    """A 2-block GPT-2 (transformers Conv1D layers) in float64, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                     eos_token_id=None)
    return GPT2LMHeadModel(cfg).double().eval()


def lm_batch(ids: list[list[int]], pad: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch dict with labels = ids on real tokens (docs/CONTRACT.md)."""
    t = max(len(s) for s in ids)
    input_ids = torch.full((len(ids), t), pad)
    mask = torch.zeros(len(ids), t, dtype=torch.long)
    for i, s in enumerate(ids):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, -100))
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "index": torch.arange(len(ids))}
