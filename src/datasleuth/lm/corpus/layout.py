"""The packed corpus format: file names, version, and the :class:`Segment` pointer.

On-disk layout of a packed corpus directory (every file written atomically through
:mod:`datasleuth.storage`, the marker ``metadata.json`` last):

* ``tokens.safetensors`` -- ``input_ids`` int32 (N, seq_len), ``lengths`` int32 (N,)
* ``offsets.safetensors`` -- ``char_starts`` int32 (N, seq_len): character offset in its
  document where each token's text piece begins (-1 for EOS separators and padding)
* ``segments.parquet`` -- one row per (sequence, document) piece: ``sequence``,
  ``doc_index``, ``char_start``, ``char_end``, ``tok_start``, ``tok_end``
* ``documents.arrow`` -- Arrow IPC file with ``doc_index`` and ``text`` of every document
* ``metadata.json`` -- format version, seq_len, counts, tokenizer identity, sources, fingerprint
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CORPUS_FORMAT_VERSION", "EOS_MARKER", "Segment"]

CORPUS_FORMAT_VERSION = 1
#: ``format`` field of metadata.json and of the safetensors headers.
FORMAT_NAME = "datasleuth.corpus"
#: Text piece shown for an EOS separator token in :meth:`PackedCorpus.token_pieces`.
EOS_MARKER = "⏎"

METADATA = "metadata.json"
TOKENS = "tokens.safetensors"
OFFSETS = "offsets.safetensors"
SEGMENTS = "segments.parquet"
DOCUMENTS = "documents.arrow"
SEGMENT_COLUMNS = ("sequence", "doc_index", "char_start", "char_end", "tok_start", "tok_end")


class Segment(NamedTuple):
    """The part of one document that lies in one training sequence.

    ``tok_start:tok_end`` are token positions in the sequence (the document's own tokens;
    its EOS separator, when it falls in this sequence, sits at ``tok_end``).
    ``char_start:char_end`` are character offsets in the original document text. The
    segments of one document, in sequence order, tile its text exactly.
    """

    doc_index: int
    char_start: int
    char_end: int
    tok_start: int
    tok_end: int
