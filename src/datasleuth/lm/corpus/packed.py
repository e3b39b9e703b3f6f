"""Read a packed corpus back: memory-mapped sequences, their segments and original text.

:class:`PackedCorpus` opens a directory written by
:func:`~datasleuth.lm.corpus.pack_corpus` (layout in :mod:`datasleuth.lm.corpus.layout`).
Token matrices are memory-mapped, so a packed corpus larger than RAM is fine; token-wise
scores (docs/method.md §6) can be drawn on the original characters
(:meth:`PackedCorpus.token_pieces`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from datasleuth.errors import DatasleuthError
from datasleuth.lm.corpus.fingerprint import corpus_fingerprint
from datasleuth.lm.corpus.layout import (
    CORPUS_FORMAT_VERSION,
    DOCUMENTS,
    EOS_MARKER,
    FORMAT_NAME,
    METADATA,
    OFFSETS,
    SEGMENT_COLUMNS,
    SEGMENTS,
    TOKENS,
    Segment,
)
from datasleuth.storage import memmap_safetensors

__all__ = ["PackedCorpus"]


class _TorchView(torch.utils.data.Dataset):
    """``torch.utils.data.Dataset`` over a :class:`PackedCorpus`; items are CONTRACT dicts."""

    def __init__(self, corpus: PackedCorpus) -> None:
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.corpus.item(i)


@dataclass
class _Arrays:
    input_ids: np.ndarray
    lengths: np.ndarray
    char_starts: np.ndarray
    seg_seq_ptr: np.ndarray  # (N+1,) row -> first segment
    segments: np.ndarray  # (S, 5): doc_index, char_start, char_end, tok_start, tok_end
    doc_rows: np.ndarray | None  # sorted doc_index values (None: doc_index == row)
    doc_order: np.ndarray | None
    documents: pa.Table


class PackedCorpus:
    """Fixed-length training sequences with pointers back to the documents they came from.

    Open with :meth:`load` or get one from :func:`pack_corpus`. Arrays are memory-mapped
    and opened lazily, so the object pickles cheaply into DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike, metadata: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.metadata = metadata
        self._arrays: _Arrays | None = None
        self._finalizer: Any = None

    # -- construction -------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike) -> PackedCorpus:
        """Open a packed corpus directory written by :func:`pack_corpus`."""
        d = Path(directory)
        meta_path = d / METADATA
        if not meta_path.is_file():
            raise DatasleuthError(
                f"{d} is not a packed corpus (no {METADATA}); pack it with pack_corpus or "
                "`datasleuth pack`"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DatasleuthError(
                f"{meta_path} is not valid JSON ({e.msg}); re-pack the corpus"
            ) from e
        if meta.get("format") != FORMAT_NAME or (
            meta.get("format_version") != CORPUS_FORMAT_VERSION
        ):
            raise DatasleuthError(
                f"{d} holds corpus format version {meta.get('format_version')}, this datasleuth "
                f"reads {CORPUS_FORMAT_VERSION}; re-pack the corpus"
            )
        for name in (TOKENS, OFFSETS, SEGMENTS, DOCUMENTS):
            if not (d / name).is_file():
                raise DatasleuthError(f"{d / name} is missing; re-pack the corpus")
        return cls(d, meta)

    @staticmethod
    def matches(
        directory: str | os.PathLike,
        documents: Any,
        tokenizer: Any,
        seq_len: int = 512,
        separator_token_id: int | None = None,
        text_field: str = "text",
        pack: bool = True,
    ) -> bool:
        """True when ``directory`` holds a complete packing of exactly these inputs."""
        meta_path = Path(directory) / METADATA
        if not meta_path.is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            return False
        if meta.get("format_version") != CORPUS_FORMAT_VERSION:
            return False
        fp = corpus_fingerprint(documents, tokenizer, seq_len, separator_token_id, text_field,
                                pack)
        return meta.get("fingerprint") == fp

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "metadata": self.metadata}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["metadata"])

    @property
    def _a(self) -> _Arrays:
        if self._arrays is None:
            fix = f"delete {self.directory} so the corpus is packed again"
            tok = memmap_safetensors(self.directory / TOKENS, fix)
            off = memmap_safetensors(self.directory / OFFSETS, fix)
            try:  # a damaged segments or documents file: refused, so the corpus is re-packed
                seg = pq.read_table(self.directory / SEGMENTS)
                cols = [seg.column(c).to_numpy() for c in SEGMENT_COLUMNS]
                docs = pa.ipc.open_file(pa.memory_map(str(self.directory / DOCUMENTS))
                                        ).read_all()
            except (pa.ArrowException, OSError, KeyError, ValueError) as e:
                raise DatasleuthError(f"{self.directory} is damaged ({e}); {fix}") from e
            n = len(tok["lengths"])
            ptr = np.searchsorted(cols[0], np.arange(n + 1), side="left")
            idx = docs.column("doc_index").to_numpy()
            if np.array_equal(idx, np.arange(len(idx))):
                rows = order = None
            else:
                order = np.argsort(idx, kind="stable")
                rows = idx[order]
            self._arrays = _Arrays(tok["input_ids"], tok["lengths"], off["char_starts"], ptr,
                                   np.stack(cols[1:], axis=1), rows, order, docs)
        return self._arrays

    # -- sequences ----------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return int(self.metadata["seq_len"])

    @property
    def num_documents(self) -> int:
        return int(self.metadata["num_documents"])

    @property
    def fingerprint(self) -> str:
        return str(self.metadata["fingerprint"])

    def __len__(self) -> int:
        return int(self.metadata["num_sequences"])

    def _check(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a corpus of {n} sequences")
        return i % n

    def input_ids(self, i: int) -> torch.Tensor:
        """Token ids of sequence ``i`` (LongTensor of shape (seq_len,), padded)."""
        return torch.from_numpy(np.asarray(self._a.input_ids[self._check(i)], dtype=np.int64))

    def length(self, i: int) -> int:
        """Number of real (non-padding) tokens in sequence ``i``."""
        return int(self._a.lengths[self._check(i)])

    def segments(self, i: int) -> list[Segment]:
        """The document pieces in sequence ``i``, in order."""
        i = self._check(i)
        a = self._a
        rows = a.segments[a.seg_seq_ptr[i]:a.seg_seq_ptr[i + 1]]
        return [Segment(*(int(v) for v in r)) for r in rows]

    def _row(self, doc_index: int) -> int:
        """The row of document ``doc_index`` in documents.arrow."""
        return int(self.document_rows(np.array([doc_index], dtype=np.int64))[0])

    def document_rows(self, doc_indices: np.ndarray) -> np.ndarray:
        """Rows of documents.arrow holding the documents ``doc_indices`` (int64 array)."""
        a = self._a
        doc_indices = np.asarray(doc_indices, dtype=np.int64)
        if a.doc_rows is None:
            rows = doc_indices
            ok = (rows >= 0) & (rows < a.documents.num_rows)
        else:
            k = np.minimum(np.searchsorted(a.doc_rows, doc_indices), len(a.doc_rows) - 1)
            ok = a.doc_rows[k] == doc_indices
            rows = a.doc_order[k]
        if not ok.all():
            bad = int(doc_indices[~ok][0])
            raise DatasleuthError(f"document {bad} is not in this corpus; check the index")
        return rows

    def document_column(self, name: str, doc_indices: np.ndarray) -> pa.Array:
        """Column ``name`` of the documents ``doc_indices`` (in that order)."""
        column = self._a.documents.column(name)
        return column.take(pa.array(self.document_rows(doc_indices))).combine_chunks()

    def sequence_documents(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sequence's documents at once: (offsets (N+1,), doc_index (S,)); those of
        sequence ``i`` are ``doc_index[offsets[i]:offsets[i+1]]``, in order."""
        a = self._a
        return np.asarray(a.seg_seq_ptr, dtype=np.int64), a.segments[:, 0].astype(np.int64)

    def document_text(self, doc_index: int) -> str:
        """The original text of document ``doc_index``."""
        return self._a.documents.column("text")[self._row(doc_index)].as_py()

    @property
    def document_field_names(self) -> list[str]:
        """The corpus's own columns kept beside the text (``id``, ``title``, ``source``...)."""
        return [c for c in self._a.documents.column_names if c not in ("doc_index", "text")]

    def document_fields(self, doc_index: int) -> dict[str, str | None]:
        """The corpus's own columns of document ``doc_index`` (e.g. ``{"id": "a7"}``)."""
        row = self._row(doc_index)
        docs = self._a.documents
        return {c: docs.column(c)[row].as_py() for c in self.document_field_names}

    def token_pieces(self, i: int) -> list[tuple[str, int, int]]:
        """``(piece, doc_index, char_start)`` for every real token of sequence ``i``.

        ``piece`` is the token's text as it appears in the original document: the
        characters from its start offset to the next token's start (so leading spaces go
        with the token before them and the pieces of a segment concatenate to exactly
        ``document_text(doc)[char_start:char_end]``). An EOS separator is shown as
        :data:`EOS_MARKER` (``"⏎"``) with ``char_start = -1`` and the doc_index of the
        document it ends. Padding is not included. (A document that tokenises to no
        tokens, e.g. only whitespace, has a segment but no pieces.)
        """
        i = self._check(i)
        n = self.length(i)
        starts = np.asarray(self._a.char_starts[i, :n], dtype=np.int64)
        out: list[tuple[str, int, int]] = []
        pos = 0
        for seg in self.segments(i):
            text = self.document_text(seg.doc_index)
            for t in range(seg.tok_start, seg.tok_end):
                s = int(starts[t])
                e = int(starts[t + 1]) if t + 1 < seg.tok_end else seg.char_end
                out.append((text[s:e], seg.doc_index, s))
            pos = seg.tok_end
            if pos < n and starts[pos] == -1:
                out.append((EOS_MARKER, seg.doc_index, -1))
                pos += 1
        return out

    def text(self, i: int) -> str:
        """Text of sequence ``i`` rebuilt from the original documents (EOS as ``"⏎"``)."""
        return "".join(p for p, _, _ in self.token_pieces(i))

    # -- torch ----------------------------------------------------------------------
    def item(self, i: int) -> dict[str, torch.Tensor]:
        """One training example as a dict of 1-D tensors (docs/CONTRACT.md)."""
        i = self._check(i)
        ids = self.input_ids(i)
        mask = (torch.arange(self.seq_len) < self.length(i)).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "index": torch.tensor(i, dtype=torch.long)}

    def as_torch_dataset(self) -> torch.utils.data.Dataset:
        """A ``torch.utils.data.Dataset`` whose items are :meth:`item` dicts."""
        return _TorchView(self)

    def collate(self, batch: Sequence[int | dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack sequence indices or :meth:`item` dicts into a CONTRACT batch dict.

        ``input_ids``/``attention_mask``/``labels`` are (B, seq_len) LongTensors, labels
        -100 on padding; ``index`` is (B,).
        """
        if len(batch) == 0:
            raise DatasleuthError("cannot collate an empty batch; pass at least one sequence")
        items = [b if isinstance(b, dict) else self.item(int(b)) for b in batch]
        return {k: torch.stack([it[k] for it in items]) for k in
                ("input_ids", "attention_mask", "labels", "index")}

    def __repr__(self) -> str:
        return (f"PackedCorpus({str(self.directory)!r}, sequences={len(self)}, "
                f"seq_len={self.seq_len}, documents={self.num_documents})")
