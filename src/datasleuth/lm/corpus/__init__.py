"""Training corpus front end: read documents, pack them into fixed-length sequences.

One job per module:

* :mod:`~datasleuth.lm.corpus.readers` -- read files, folders and datasets (streamed or not)
* :mod:`~datasleuth.lm.corpus.fingerprint` -- tokenizer identity and packing fingerprints
* :mod:`~datasleuth.lm.corpus.packing` -- tokenise and pack documents to disk
* :mod:`~datasleuth.lm.corpus.packed` -- :class:`PackedCorpus`, the packed corpus read back
* :mod:`~datasleuth.lm.corpus.layout` -- the on-disk format and :class:`Segment`
"""

from __future__ import annotations

from datasleuth.lm.corpus.fingerprint import corpus_fingerprint, tokenizer_info
from datasleuth.lm.corpus.layout import CORPUS_FORMAT_VERSION, EOS_MARKER, Segment
from datasleuth.lm.corpus.packed import PackedCorpus
from datasleuth.lm.corpus.packing import pack_corpus
from datasleuth.lm.corpus.readers import load_documents

__all__ = [
    "CORPUS_FORMAT_VERSION",
    "EOS_MARKER",
    "Segment",
    "PackedCorpus",
    "load_documents",
    "pack_corpus",
    "corpus_fingerprint",
    "tokenizer_info",
]
