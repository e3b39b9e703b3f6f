"""The demo tokenizer: byte-level BPE trained offline on the demo corpus.

It follows GPT-2's conventions: no special tokens are added when text is encoded,
``<|endoftext|>`` is both bos and eos, and a separate ``<|pad|>`` token pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasleuth.errors import DatasleuthError

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "build_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def build_tokenizer(
    documents: Sequence[str], vocab_size: int = 1500, max_length: int = 128
) -> Any:
    """Train a byte-level BPE tokenizer on ``documents`` (offline) and wrap it for transformers.

    Returns a fast ``PreTrainedTokenizerFast`` with GPT-2 conventions: ``<|endoftext|>`` is
    bos, eos and unk, ``<|pad|>`` pads, and encoding adds no special tokens. Every string
    encodes (byte-level) and decodes back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not documents:
        raise DatasleuthError("no documents to train the tokenizer on; pass a non-empty list")
    if vocab_size < 300:
        raise DatasleuthError(f"vocab_size={vocab_size} is too small; use at least 300")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(documents), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
