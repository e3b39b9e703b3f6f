"""Training the demo model: a small GPT-2 on the demo corpus, and scoring a completion.

:func:`train_model` trains ``GPT2LMHeadModel`` (whose linear layers are transformers'
``Conv1D``, exactly as in users' GPT-2 models) with AdamW on packed sequences;
:func:`completion_logprob` measures what it learnt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from datasleuth.errors import DatasleuthError

__all__ = ["train_model", "completion_logprob"]


def _packed_rows(
    docs: list[list[int]], seq_len: int, eos_id: int, gen: Any
) -> Iterator[list[int]]:
    """Yield rows of at most ``seq_len`` tokens packed with whole documents, forever.

    Each pass shuffles the documents and fills rows greedily with ``doc + [eos]``; a document
    never straddles two rows, so every row starts at a document start (as when the tool later
    scores each document on its own).
    """
    import torch

    while True:
        row: list[int] = []
        for j in torch.randperm(len(docs), generator=gen).tolist():
            ids = (docs[j] + [eos_id])[:seq_len]
            if len(row) + len(ids) > seq_len:
                yield row
                row = []
            row.extend(ids)
        if row:
            yield row


def _check_sizes(
    documents: Sequence[str], steps: int, batch_size: int, seq_len: int, n_embd: int,
    n_head: int,
) -> None:
    """Refuse training sizes that cannot work."""
    if not documents:
        raise DatasleuthError("no documents to train on; pass a non-empty list")
    if steps < 1 or batch_size < 1 or seq_len < 8:
        raise DatasleuthError("steps, batch_size must be >= 1 and seq_len >= 8; fix the config")
    if n_embd % n_head:
        raise DatasleuthError(f"n_embd={n_embd} is not divisible by n_head={n_head}; change one")


def _new_gpt2(
    tokenizer: Any, encoded: list[list[int]], seq_len: int, n_layer: int, n_embd: int,
    n_head: int,
) -> Any:
    """A GPT-2 at initialisation (from torch's global RNG), without dropout.

    Its ``n_positions`` (and ``tokenizer.model_max_length``, set here) fit the longest
    document, so the tool can later score each one without truncation (training windows stay
    at ``seq_len``; positions beyond it are only seen by longer documents).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    longest = max(len(ids) for ids in encoded) + 1
    n_positions = max(seq_len, -(-longest // 32) * 32)
    tokenizer.model_max_length = n_positions
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def _optimizer(
    model: Any, learning_rate: float, weight_decay: float, warmup_steps: int, steps: int
) -> tuple[Any, Any]:
    """AdamW (no decay on biases and norms) with linear warm-up and cosine decay to 10 %."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay,
                                                           "weight_decay": 0.0}],
        lr=learning_rate,
        betas=(0.9, 0.98),
    )

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _next_batch(rows: Iterator[list[int]], batch_size: int, pad_id: int) -> dict[str, Any]:
    """The model inputs for the next ``batch_size`` rows, right-padded; pads get label -100."""
    import torch

    batch = [next(rows) for _ in range(batch_size)]
    width = max(len(r) for r in batch)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    for b, r in enumerate(batch):
        input_ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    labels = input_ids.masked_fill(mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train_model(
    documents: Sequence[str],
    tokenizer: Any,
    *,
    seq_len: int = 128,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    steps: int = 400,
    batch_size: int = 16,
    learning_rate: float = 6e-3,
    warmup_steps: int = 20,
    weight_decay: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> Any:
    """Train a small GPT-2 (``GPT2LMHeadModel``) on ``documents`` and return it in eval mode.

    AdamW with linear warm-up and cosine decay to 10 %, gradient clipping at 1, no dropout,
    next-token loss on rows packed with whole documents (pads carry label -100). The model's
    ``n_positions`` (and ``tokenizer.model_max_length``, set here) fit the longest document.
    With the defaults this takes about 30-60 s on two idle CPU cores.
    """
    import torch

    _check_sizes(documents, steps, batch_size, seq_len, n_embd, n_head)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    encoded = tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]
    model = _new_gpt2(tokenizer, encoded, seq_len, n_layer, n_embd, n_head)
    model.train()
    rows = _packed_rows(encoded, seq_len, tokenizer.eos_token_id, gen)
    optimizer, scheduler = _optimizer(model, learning_rate, weight_decay, warmup_steps, steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training demo model", unit="step")
    for _ in range(steps):
        loss = model(**_next_batch(rows, batch_size, tokenizer.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def completion_logprob(model: Any, tokenizer: Any, prompt: str, completion: str) -> float:
    """Return ``log p(completion | prompt)`` under ``model`` in nats (sum over its tokens).

    The completion's tokens are those whose character offsets start at or after the end of
    the prompt in the tokenised ``prompt + completion``.
    """
    import torch

    enc = tokenizer(prompt + completion, return_offsets_mapping=True, return_tensors="pt")
    starts = enc["offset_mapping"][0, :, 0]
    is_completion = starts >= len(prompt)
    ids = enc["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logp[is_completion[1:]].sum())
