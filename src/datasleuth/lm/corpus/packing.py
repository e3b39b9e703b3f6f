"""Pack documents into fixed-length training sequences that point back to their text.

Influence scores are computed per *training sequence* (docs/method.md §1: L(z, θ) is summed
over the tokens of one sequence z). Pretraining-style packing concatenates documents,
separated by an EOS token, and cuts the stream into sequences of exactly ``seq_len``
tokens. Every sequence keeps pointers back to the characters of the documents it came
from (:class:`~datasleuth.lm.corpus.Segment`). Tokens stream to disk batch by batch, so
memory stays bounded whatever the corpus size; the files are those of
:mod:`datasleuth.lm.corpus.layout`, written through :mod:`datasleuth.storage`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from datasleuth.errors import DatasleuthError
from datasleuth.lm.corpus import layout
from datasleuth.lm.corpus.fingerprint import (
    ContentHash,
    fingerprint,
    separator_id,
    source_key,
    tokenizer_info,
)
from datasleuth.lm.corpus.packed import PackedCorpus
from datasleuth.lm.corpus.readers import SOURCES_ATTR, is_paths, iter_batches, load_documents
from datasleuth.progress import progress_bar
from datasleuth.storage import atomic_path, replace_durably, write_json, write_safetensors_stream

__all__ = ["pack_corpus"]

_DOC_SCHEMA = pa.schema([("doc_index", pa.int64()), ("text", pa.large_string())])


#: Characters tokenised at a time: a longer document is cut into pieces at whitespace and
#: each piece tokenised alone, so the tokenizer's memory (about 200 bytes per token) and
#: the packer's arrays stay bounded by this and ``seq_len``, whatever a document's length
#: (128 Ki characters: about 30 MB of tokenizer output).
PIECE_CHARS = 1 << 17


class _Piece(NamedTuple):
    """Characters ``offset:offset+len(text)`` of the batch's document ``k``."""

    k: int
    text: str
    offset: int
    last: bool  # the document's last piece: its separator follows


def _cut(text: str, start: int, limit: int) -> int:
    """Where the piece of ``text`` from ``start`` ends: at most ``limit`` characters on, just
    before a run of whitespace when one is in the second half (a pre-token boundary)."""
    end = start + limit
    if end >= len(text):
        return len(text)
    for j in range(end, start + limit // 2, -1):
        if text[j].isspace() and not text[j - 1].isspace():
            return j
    return end


def _pieces(texts: list[str], limit: int) -> list[list[_Piece]]:
    """The batch's documents as groups of pieces of about ``limit`` characters in all."""
    groups: list[list[_Piece]] = [[]]
    size = 0
    for k, text in enumerate(texts):
        start = 0
        while True:
            end = _cut(text, start, limit)
            groups[-1].append(_Piece(k, text[start:end], start, end >= len(text)))
            size += end - start
            if size >= limit:
                groups.append([])
                size = 0
            if end >= len(text):
                break
            start = end
    return [g for g in groups if g]


def _tokenize(tokenizer: Any, pieces: list[_Piece], sep: int) -> tuple[np.ndarray, ...]:
    """Tokenise pieces of documents; returns flat arrays (ids, char starts, char ends,
    ordinal, is_eos), character offsets counted in the whole document."""
    enc = tokenizer([p.text for p in pieces], add_special_tokens=False,
                    return_offsets_mapping=True, return_attention_mask=False,
                    return_token_type_ids=False)
    ids_l, starts_l, ends_l, ord_l, eos_l = [], [], [], [], []
    for piece, ids, offsets in zip(pieces, enc["input_ids"], enc["offset_mapping"],
                                   strict=True):
        n, tlen = len(ids), len(piece.text)
        if n:
            starts = np.asarray(offsets, dtype=np.int64).reshape(n, 2)[:, 0]
            starts = np.clip(np.maximum.accumulate(starts), 0, tlen)
            starts[0] = 0  # leading whitespace belongs to the first token's piece
            ends = np.append(starts[1:], tlen)
            eos_start = tlen
        else:  # a document with no tokens: its EOS carries the (whitespace) text
            starts = ends = np.zeros(0, dtype=np.int64)
            eos_start = 0
        extra = 1 if piece.last else 0  # the separator after the document's last piece
        ids_l.append(np.append(np.asarray(ids, dtype=np.int64), [sep] * extra))
        starts_l.append(np.append(starts, [eos_start] * extra) + piece.offset)
        ends_l.append(np.append(ends, [tlen] * extra) + piece.offset)
        ord_l.append(np.full(n + extra, piece.k, dtype=np.int64))
        eos_l.append(np.append(np.zeros(n, dtype=bool), [True] * extra))
    return (np.concatenate(ids_l), np.concatenate(starts_l), np.concatenate(ends_l),
            np.concatenate(ord_l), np.concatenate(eos_l))


class _Packer:
    """Streams tokens into fixed-length rows on disk; keeps at most one batch in memory.

    ``pack=False`` gives every document a row of its own (its tokens and separator,
    padded; cut at ``seq_len`` tokens, counted in ``truncated``).
    """

    def __init__(self, workdir: Path, seq_len: int, sep: int, pad: int, pack: bool = True
                 ) -> None:
        self.seq_len, self.sep, self.pad, self.pack = seq_len, sep, pad, pack
        self.ids_path, self.starts_path = workdir / "ids.bin", workdir / "starts.bin"
        self.ids_f = open(self.ids_path, "wb")  # noqa: SIM115 -- closed in finish()
        self.starts_f = open(self.starts_path, "wb")  # noqa: SIM115
        self.lengths: list[int] = []
        self.seg_path = workdir / "segments.parquet"
        self.seg_schema = pa.schema([(c, pa.int64()) for c in layout.SEGMENT_COLUMNS])
        self.seg_writer = pq.ParquetWriter(self.seg_path, self.seg_schema)
        self.pending: tuple[np.ndarray, ...] | None = None  # ids, starts, ends, ord, eos
        self.idx = np.zeros(0, dtype=np.int64)  # original doc index of ordinals idx_base..
        self.idx_base = 0
        self.n_docs = 0
        self.n_tokens = 0
        self.text_tokens = 0  # tokens of the documents themselves, separators not counted
        self.text_chars = 0  # their characters other than whitespace
        self.max_id = -1
        self.truncated = [0, 0]  # documents cut at seq_len (pack=False), tokens dropped

    def add(self, batch: list[tuple[int, str]], tokenizer: Any) -> None:
        texts = [t for _, t in batch]
        self.text_chars += sum(len(t) - sum(map(t.count, " \n\t\r")) for t in texts)
        groups = _pieces(texts, PIECE_CHARS)
        if not self.pack:  # documents are cut at seq_len: their arrays are one batch's
            pieces = [p for g in groups for p in g]
            self._add_documents(batch, self._counted(_tokenize(tokenizer, pieces, self.sep)))
            return
        base = self.n_docs
        self.idx = np.append(self.idx, np.array([i for i, _ in batch], dtype=np.int64))
        self.n_docs += len(batch)
        for group in groups:  # memory: one group of pieces and less than one row pending
            ids, starts, ends, ords, eos = self._counted(_tokenize(tokenizer, group, self.sep))
            self._push((ids, starts, ends, ords + base, eos))

    def _counted(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        ids, eos = arrays[0], arrays[4]
        self.text_tokens += int(len(ids) - eos.sum())
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))
        return arrays

    def _push(self, new: tuple[np.ndarray, ...]) -> None:
        """Append tokens to the stream and write every full row."""
        if not len(new[0]):  # a piece of whitespace only: nothing to add
            return
        if self.pending is not None:
            new = tuple(np.concatenate([a, b]) for a, b in zip(self.pending, new, strict=True))
        n_full = len(new[0]) // self.seq_len * self.seq_len
        if n_full:
            self._emit(tuple(a[:n_full] for a in new))
        rest = tuple(a[n_full:] for a in new)
        self.pending = rest if len(rest[0]) else None
        ords, eos = new[3], new[4]
        keep = int(rest[3][0]) if self.pending is not None else int(ords[-1]) + int(eos[-1])
        self.idx = self.idx[keep - self.idx_base:]  # forget documents fully written
        self.idx_base = keep

    def _add_documents(self, batch: list[tuple[int, str]], arrays: tuple[np.ndarray, ...]
                       ) -> None:
        """One row per document (pack=False): its tokens and separator, cut at seq_len."""
        ids, starts, ends, ords, eos = arrays
        L, n_docs = self.seq_len, len(batch)
        bounds = np.searchsorted(ords, np.arange(n_docs + 1))  # doc k: bounds[k]:bounds[k+1]
        rows = np.full((n_docs, L), self.pad, dtype=np.int64)  # (D, L)
        row_starts = np.full((n_docs, L), -1, dtype=np.int64)  # (D, L)
        keep = np.minimum(np.diff(bounds), L)  # (D,) tokens kept, separator included
        char_end = np.zeros(n_docs, dtype=np.int64)
        tok_end = np.zeros(n_docs, dtype=np.int64)
        for k in range(n_docs):
            lo, n = int(bounds[k]), int(keep[k])
            rows[k, :n] = ids[lo:lo + n]
            row_starts[k, :n] = np.where(eos[lo:lo + n], -1, starts[lo:lo + n])
            n_text = int(bounds[k + 1]) - lo - 1  # the document's own tokens
            tok_end[k] = min(n_text, L)  # the separator, when kept, sits at tok_end
            char_end[k] = ends[lo + n - 1]
            if n_text > L:
                self.truncated[0] += 1
                self.truncated[1] += n_text - L
        first_row = len(self.lengths)
        self.seg_writer.write_table(pa.table({
            "sequence": np.arange(first_row, first_row + n_docs), "doc_index": self.idx_of(batch),
            "char_start": np.zeros(n_docs, dtype=np.int64), "char_end": char_end,
            "tok_start": np.zeros(n_docs, dtype=np.int64), "tok_end": tok_end,
        }, schema=self.seg_schema))
        self.ids_f.write(rows.astype("<i4").tobytes())
        self.starts_f.write(row_starts.astype("<i4").tobytes())
        self.lengths.extend(int(n) for n in keep)
        self.n_tokens += int(keep.sum())
        self.n_docs += n_docs

    @staticmethod
    def idx_of(batch: list[tuple[int, str]]) -> np.ndarray:
        return np.array([i for i, _ in batch], dtype=np.int64)

    def _emit(self, arrays: tuple[np.ndarray, ...]) -> None:
        ids, starts, ends, ords, eos = arrays
        L = self.seq_len
        n = len(ids)
        first_row = len(self.lengths)
        pos = np.arange(n)
        brk = np.ones(n, dtype=bool)
        brk[1:] = (ords[1:] != ords[:-1]) | (pos[1:] % L == 0)
        run_start = np.flatnonzero(brk)
        last = np.append(run_start[1:], n) - 1
        row = run_start // L
        tok_end = last + 1 - eos[last].astype(np.int64) - row * L
        doc = self.idx[ords[run_start] - self.idx_base]
        table = pa.table({
            "sequence": row + first_row, "doc_index": doc,
            "char_start": starts[run_start], "char_end": ends[last],
            "tok_start": run_start - row * L, "tok_end": tok_end,
        }, schema=self.seg_schema)
        self.seg_writer.write_table(table)
        tok_starts = np.where(eos, -1, starts)
        if n % L:  # the final, partial sequence
            padn = L - n % L
            ids = np.append(ids, np.full(padn, self.pad, dtype=np.int64))
            tok_starts = np.append(tok_starts, np.full(padn, -1, dtype=np.int64))
        self.ids_f.write(ids.astype("<i4").tobytes())
        self.starts_f.write(tok_starts.astype("<i4").tobytes())
        rows = len(ids) // L
        self.lengths.extend([L] * rows)
        if n % L:
            self.lengths[-1] = n % L
        self.n_tokens += n

    def finish(self) -> None:
        if self.pending is not None:
            self._emit(self.pending)
            self.pending = None
        self.ids_f.close()
        self.starts_f.close()
        self.seg_writer.close()


def pack_corpus(
    documents: Any,
    tokenizer: Any,
    seq_len: int = 512,
    output_dir: str | os.PathLike | None = None,
    batch_size: int = 1000,
    progress: bool = True,
    separator_token_id: int | None = None,
    text_field: str = "text",
    streaming: bool = False,
    pack: bool = True,
) -> PackedCorpus:
    """Tokenise documents, join them with EOS and cut the stream into ``seq_len`` rows.

    ``documents``: corpus paths (a ``str``/``Path``, or a list of ``Path`` objects; read
    with :func:`load_documents`), a ``datasets`` Dataset/IterableDataset with a ``text``
    (or ``text_field``) column and optionally a ``doc_index`` column, or a sequence of
    document strings / dicts (a list of ``str`` is always texts, never paths). Tokenisation uses
    ``add_special_tokens=False``; the separator (``separator_token_id``, default the EOS
    token) follows *every* document, the last included. The last row is padded (pad
    token, else the separator) and its true length recorded. With ``output_dir`` the
    result is stored there (see :mod:`datasleuth.lm.corpus.layout`); without it, in a
    temporary directory removed when the object is garbage collected. Memory stays
    bounded by one batch of ``batch_size`` documents.

    ``pack=False`` keeps one document per sequence instead (its tokens and separator,
    padded), for document-level results; a document longer than ``seq_len`` tokens is
    cut there and counted in the metadata (``truncated_documents``,
    ``truncated_tokens``). A packing whose documents gave almost no tokens (fewer than
    one per 100 non-space characters) is refused: the tokenizer is not the corpus's.
    """
    _check_tokenizer(tokenizer, seq_len)
    sep = separator_id(tokenizer, separator_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    info = tokenizer_info(tokenizer)
    if is_paths(documents):  # streaming: read the files as they are, no Arrow cache copy
        documents = load_documents(documents, text_field=text_field, streaming=streaming)
    sources = getattr(documents, SOURCES_ATTR, None)
    out, cleanup = _output_directory(output_dir)
    work = Path(tempfile.mkdtemp(prefix=".packing-", dir=out))
    try:
        packer = _Packer(work, seq_len, sep, pad, pack)
        content = _read_documents(packer, documents, tokenizer, out / layout.DOCUMENTS, text_field,
                                  batch_size, progress)
        _check_tokens(packer)
        _write_rows(out, packer)
        key = source_key(sources) if sources is not None else content.key()
        meta = _metadata(packer, info, text_field, sources, content.hexdigest())
        meta["fingerprint"] = fingerprint(key, info, seq_len, sep, text_field, pack)
        write_json(out / layout.METADATA, meta)  # the marker: written last
    except BaseException:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    corpus = PackedCorpus.load(out)
    if cleanup is not None:
        corpus._finalizer = weakref.finalize(corpus, shutil.rmtree, str(cleanup), True)
    return corpus


#: Fewest tokens per non-space character of the corpus a packing may have.
MIN_TOKENS_PER_CHAR = 0.01


def _check_tokens(packer: _Packer) -> None:
    """Refuse a packing whose documents gave (almost) no tokens of their own."""
    tokens, chars = packer.text_tokens, packer.text_chars
    if chars == 0:
        raise DatasleuthError(
            "every document of the corpus is empty or blank, so there is no text to trace; "
            "check the corpus, and --text-field if it has several text columns"
        )
    if tokens < MIN_TOKENS_PER_CHAR * chars:
        raise DatasleuthError(
            f"the tokenizer turned {chars} characters of text into {tokens} tokens, so the "
            "packed sequences would be (almost) only separators; use the model's own "
            "tokenizer (--tokenizer FOLDER) and check --text-field"
        )


def _check_tokenizer(tokenizer: Any, seq_len: int) -> None:
    if seq_len < 1:
        raise DatasleuthError(f"seq_len must be a positive number of tokens, got {seq_len}")
    if not getattr(tokenizer, "is_fast", False):
        raise DatasleuthError(
            "packing needs a fast tokenizer (character offsets); load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )


def _output_directory(output_dir: str | os.PathLike | None) -> tuple[Path, Path | None]:
    """The directory to pack into, and the same path again if it is temporary."""
    if output_dir is None:
        out = Path(tempfile.mkdtemp(prefix="datasleuth-corpus-"))
        return out, out
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / layout.METADATA).unlink(missing_ok=True)  # the old marker goes first
    return out, None


def _read_documents(packer: _Packer, documents: Any, tokenizer: Any, path: Path,
                    text_field: str, batch_size: int, progress: bool) -> ContentHash:
    """Feed every document to ``packer`` and to the documents file; hash their text."""
    content = ContentHash()
    total = len(documents) if hasattr(documents, "__len__") else None
    bar = progress_bar(iter_batches(documents, text_field, batch_size), desc="pack corpus",
                       enabled=progress, total=total, unit="document", weight=len)
    with atomic_path(path) as tmp:
        writer = None
        with pa.OSFile(str(tmp), "wb") as sink:
            for batch in bar:
                for idx, text in batch:
                    content.update(idx, text)
                record = _record_batch(batch)
                if writer is None:
                    writer = pa.ipc.new_file(sink, record.schema)
                writer.write_batch(record)
                packer.add(batch, tokenizer)
            if writer is None:
                raise DatasleuthError("the corpus holds no documents; add documents")
            writer.close()
            packer.finish()
    return content


def _record_batch(batch: Any) -> pa.RecordBatch:
    """``doc_index``, ``text`` and the corpus's own columns of one batch, for documents.arrow."""
    fields = getattr(batch, "fields", {})
    columns = [pa.array([i for i, _ in batch], pa.int64()),
               pa.array([t for _, t in batch], pa.large_string())]
    columns += [pa.array(values, pa.large_string()) for values in fields.values()]
    schema = pa.schema(list(_DOC_SCHEMA) + [(name, pa.large_string()) for name in fields])
    return pa.record_batch(columns, schema=schema)


def _write_rows(out: Path, packer: _Packer) -> None:
    """Move the packed token, offset and segment files into ``out``."""
    n_rows, seq_len = len(packer.lengths), packer.seq_len
    lengths = np.asarray(packer.lengths, dtype=np.int32)
    write_safetensors_stream(out / layout.TOKENS, [
        ("input_ids", "I32", (n_rows, seq_len), packer.ids_path),
        ("lengths", "I32", (n_rows,), lengths),
    ], {"format": layout.FORMAT_NAME, "seq_len": str(seq_len)})
    write_safetensors_stream(out / layout.OFFSETS, [
        ("char_starts", "I32", (n_rows, seq_len), packer.starts_path),
    ], {"format": layout.FORMAT_NAME})
    replace_durably(packer.seg_path, out / layout.SEGMENTS)


def _metadata(packer: _Packer, info: dict[str, Any], text_field: str,
              sources: list[str] | None, content_sha256: str) -> dict[str, Any]:
    """metadata.json of a packing, less its fingerprint."""
    return {
        "format": layout.FORMAT_NAME,
        "format_version": layout.CORPUS_FORMAT_VERSION,
        "seq_len": packer.seq_len,
        "num_sequences": len(packer.lengths),
        "num_tokens": packer.n_tokens,
        "num_documents": packer.n_docs,
        "separator_token_id": packer.sep,
        "packed": packer.pack,
        "max_token_id": packer.max_id,
        "truncated_documents": packer.truncated[0],
        "truncated_tokens": packer.truncated[1],
        "pad_token_id": int(packer.pad),
        "eos_marker": layout.EOS_MARKER,
        "text_field": text_field,
        "tokenizer": info,
        "source_paths": sources or [],
        "content_sha256": content_sha256,
    }
