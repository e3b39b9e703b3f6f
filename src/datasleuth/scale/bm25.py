"""BM25 candidate filter over model tokens (docs/method.md §5; Grosse et al. 2023, §3.2.1).

Before paying for per-sequence gradients, each query keeps only the top ``K`` training
sequences (10,000 in the paper) ranked by a modified Okapi BM25 computed on *model token
ids*, not words. With C training sequences, n_t of which contain token t, and a query Q:

    score(Q, T) = Σ_{t ∈ set(Q)} IDF(t) · (k1 + 1) · x(t, T) / (x(t, T) + k1 · L(T))
    IDF(t)      = log((C − n_t + 0.5) / (n_t + 0.5) + 1)
    x(t, T)     = 1 if token t occurs in T, else 0            (binary presence, no counts)
    L(T)        = 1 − b + b · |T| / avg_T' |T'|               (|T| = number of DISTINCT tokens)

Decisions (see also the metadata written by :meth:`CandidateFilter.save`):

* ``k1 = 1.5`` as in the paper.
* ``b = 0`` by default. Grosse et al. write the score with a binary presence indicator and
  no document-length term (their training sequences are packed to one fixed length), so
  ``L(T) = 1``; the presence weight is then (k1 + 1)/(1 + k1) = 1 and the score reduces to
  the summed IDF of the distinct query tokens found in T. ``b`` is settable; with ``b > 0``
  the length of a sequence is its number of distinct (non-ignored) tokens, consistent with
  binary term frequency. Standard Okapi BM25 uses ``b = 0.75``.
* Repeated query tokens count ONCE (the sum runs over the set of query tokens), mirroring
  the binary treatment of the training side.
* ``ignore_ids`` (padding, end-of-sequence, ...) are dropped from training sequences and
  queries alike, so they neither score nor count towards n_t or |T|.
* Query tokens never seen in the corpus (including ids beyond ``vocab_size``) contribute 0,
  exactly as the formula gives (x = 0 for every sequence).

The index is a :class:`bm25s.BM25` retriever with ``method="atire"`` (term-frequency part
(k1+1)·tf/(tf + k1·L)) and ``idf_method="lucene"`` (log(1 + (N − df + 0.5)/(df + 0.5))),
fed with each sequence's distinct token ids, which is exactly the formula above (the
"lucene" term-frequency part lacks the (k1 + 1) factor: same ranking, scores off by a
constant). Its eager CSC score matrix (rows: sequences, columns: token ids) is filled here
with vectorised NumPy over a *streamed* corpus, because ``bm25s.BM25.index`` needs the
whole tokenised corpus as Python lists and loops over it three times; the test suite
checks that the arrays equal the ones ``bm25s`` builds itself. Query scoring, and the
on-disk format (``.npy`` arrays written and read with ``allow_pickle=False`` plus JSON),
are ``bm25s``'s own.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import bm25s
import numpy as np

from datasleuth.errors import DatasleuthError
from datasleuth.storage import atomic_path

__all__ = [
    "DEFAULT_B",
    "DEFAULT_K1",
    "DEFAULT_TOP_K",
    "FILTER_WARNING",
    "CandidateFilter",
]

FILTER_WARNING = (
    "candidates were pre-selected by BM25 token overlap; influential sequences with little "
    "word overlap may be missed"
)
"""Printed by the CLI and reports whenever the candidate filter was used (docs/method.md §5)."""

DEFAULT_K1 = 1.5
DEFAULT_B = 0.0
DEFAULT_TOP_K = 10_000

FORMAT_NAME = "datasleuth.bm25_candidate_filter"
FORMAT_VERSION = 1
METADATA_NAME = "candidate_filter.json"

_BM25S_METHOD = "atire"
_BM25S_IDF_METHOD = "lucene"
_INT32_MAX = np.iinfo(np.int32).max
_DTYPES = ("float32", "float64")

TokenSequence = Sequence[int] | np.ndarray


def _as_token_array(tokens: Any, what: str) -> np.ndarray:
    """Return ``tokens`` as a 1-D int64 array, raising a one-line error on bad input."""
    arr = np.asarray(tokens)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1:
        raise DatasleuthError(
            f"{what} must be a 1-D sequence of token ids, got shape {arr.shape}; "
            "pass one sequence of integer token ids at a time"
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DatasleuthError(
            f"{what} must hold integer token ids, got dtype {arr.dtype}; "
            "pass the tokenizer's integer ids"
        )
    arr = arr.astype(np.int64, copy=False)
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high > _INT32_MAX:
        raise DatasleuthError(
            f"{what} holds token id {low if low < 0 else high} outside [0, 2**31 - 1]; "
            "pass the tokenizer's non-negative token ids"
        )
    return arr


def _distinct_pairs(
    chunk: list[np.ndarray], first_doc: int, ignore: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (sequence, token) pairs of one chunk, sorted by sequence then token."""
    lengths = np.fromiter((a.size for a in chunk), dtype=np.int64, count=len(chunk))
    ids = np.concatenate(chunk) if chunk else np.zeros(0, dtype=np.int64)
    local = np.repeat(np.arange(len(chunk), dtype=np.int64), lengths)
    if ignore.size:
        keep = ~np.isin(ids, ignore)
        ids, local = ids[keep], local[keep]
    keys = np.unique((local << 32) | ids)
    docs = (keys >> 32) + first_doc
    tokens = keys & 0xFFFFFFFF
    return docs.astype(np.int32), tokens.astype(np.int32)


def _check_build_settings(k1: float, b: float, chunk_size: int, dtype: str,
                          corpus_fingerprint: Any) -> None:
    """Refuse BM25 parameters and build settings outside their ranges, in one line."""
    if not (math.isfinite(k1) and k1 >= 0):
        raise DatasleuthError(f"BM25 k1 must be a finite number >= 0, got {k1}; use 1.5")
    if not (math.isfinite(b) and 0.0 <= b <= 1.0):
        raise DatasleuthError(f"BM25 b must lie in [0, 1], got {b}; use 0 (paper) or 0.75")
    if chunk_size < 1:
        raise DatasleuthError(f"chunk_size must be >= 1, got {chunk_size}; use e.g. 4096")
    if dtype not in _DTYPES:
        raise DatasleuthError(f"dtype must be one of {_DTYPES}, got {dtype!r}; use 'float32'")
    if not isinstance(corpus_fingerprint, str):
        raise DatasleuthError("corpus_fingerprint must be a string; pass the corpus hash")


def _collect_pairs(
    token_sequences: Iterable[TokenSequence], ignore: np.ndarray, chunk_size: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Distinct (sequence, token) pairs of the whole corpus, read in chunks; and its size."""
    doc_parts: list[np.ndarray] = []
    token_parts: list[np.ndarray] = []
    chunk: list[np.ndarray] = []
    num_docs = 0

    def flush() -> None:
        nonlocal num_docs, chunk
        docs, tokens = _distinct_pairs(chunk, num_docs, ignore)
        doc_parts.append(docs)
        token_parts.append(tokens)
        num_docs += len(chunk)
        chunk = []

    for sequence in token_sequences:
        chunk.append(_as_token_array(sequence, f"training sequence {num_docs + len(chunk)}"))
        if len(chunk) == chunk_size:
            flush()
            if num_docs > _INT32_MAX:
                raise DatasleuthError(
                    "the BM25 filter holds at most 2**31 - 1 sequences; "
                    "split the corpus into shards"
                )
    if chunk:
        flush()
    if num_docs == 0:
        raise DatasleuthError(
            "the BM25 candidate filter got no training sequences; pass the tokenised corpus"
        )
    return np.concatenate(doc_parts), np.concatenate(token_parts), num_docs


def _vocab_size(tokens: np.ndarray, vocab_size: int | None) -> int:
    """The given vocabulary size (checked against the ids seen), else the largest id + 1."""
    seen = int(tokens.max()) + 1 if tokens.size else 0
    if vocab_size is None:
        return max(seen, 1)
    if vocab_size < seen:
        raise DatasleuthError(
            f"vocab_size={vocab_size} but the corpus holds token id {seen - 1}; "
            "pass the tokenizer's full vocabulary size"
        )
    return vocab_size


def _score_matrix(
    token_sequences: Iterable[TokenSequence], ignore: np.ndarray, *, chunk_size: int,
    vocab_size: int | None, k1: float, b: float, dtype: str,
) -> tuple[dict[str, Any], int]:
    """``bm25s``'s eager CSC score matrix (columns: token ids) and the vocabulary size.

    The pair arrays are dropped as soon as they are used: memory peaks at a few numbers
    per distinct (sequence, token) pair.
    """
    docs, tokens, num_docs = _collect_pairs(token_sequences, ignore, chunk_size)
    vocab_size = _vocab_size(tokens, vocab_size)
    # n_t (document frequency) and |T| (distinct tokens per sequence).
    doc_freq = np.bincount(tokens, minlength=vocab_size)
    doc_len = np.bincount(docs, minlength=num_docs).astype(np.float64)
    idf = np.log1p((num_docs - doc_freq + 0.5) / (doc_freq + 0.5))

    # CSC layout (columns = token ids); a stable sort keeps sequences ascending per column.
    order = np.argsort(tokens, kind="stable")
    del tokens
    indices = docs[order].astype(np.int32)
    del docs, order
    indptr = np.zeros(vocab_size + 1, dtype=np.int64)
    np.cumsum(doc_freq, out=indptr[1:])

    mean_len = float(doc_len.mean())
    if b == 0.0 or mean_len == 0.0:
        norm = np.ones(indices.size, dtype=np.float64)
    else:
        norm = (1.0 - b + b * doc_len / mean_len)[indices]
    data = np.repeat(idf * (k1 + 1.0), doc_freq) / (1.0 + k1 * norm)
    scores = {"data": data.astype(dtype), "indices": indices, "indptr": indptr,
              "num_docs": num_docs}
    return scores, vocab_size


class CandidateFilter:
    """Per-query top-K pre-selection of training sequences by binary-presence BM25.

    Build with :meth:`build` (or restore with :meth:`load`), then call :meth:`top_k` per
    query. The formula, the choice of ``b`` and the handling of repeated query tokens are
    documented in the module docstring (docs/method.md §5, Grosse et al. 2023 §3.2.1). Whenever
    results depend on this filter, print :data:`FILTER_WARNING`.
    """

    def __init__(
        self,
        retriever: bm25s.BM25,
        *,
        num_sequences: int,
        vocab_size: int,
        k1: float,
        b: float,
        ignore_ids: tuple[int, ...],
        corpus_fingerprint: str,
        dtype: str,
    ) -> None:
        """Wrap a filled ``bm25s`` retriever; use :meth:`build` or :meth:`load` instead."""
        self._retriever = retriever
        self.num_sequences = num_sequences
        self.vocab_size = vocab_size
        self.k1 = k1
        self.b = b
        self.ignore_ids = ignore_ids
        self.corpus_fingerprint = corpus_fingerprint
        self.dtype = dtype
        self._ignore = np.asarray(ignore_ids, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"CandidateFilter(num_sequences={self.num_sequences}, vocab_size={self.vocab_size}, "
            f"k1={self.k1}, b={self.b}, nnz={self.nnz})"
        )

    @property
    def nnz(self) -> int:
        """Number of distinct (sequence, token) pairs stored in the index."""
        return int(self._retriever.scores["indptr"][-1])

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        token_sequences: Iterable[TokenSequence],
        *,
        k1: float = DEFAULT_K1,
        b: float = DEFAULT_B,
        ignore_ids: Iterable[int] = (),
        vocab_size: int | None = None,
        corpus_fingerprint: str = "",
        chunk_size: int = 4096,
        dtype: str = "float32",
    ) -> CandidateFilter:
        """Index a training corpus, streaming over it once in chunks of ``chunk_size``.

        ``token_sequences`` yields one sequence of token ids per training sequence (lists,
        1-D arrays or CPU tensors; a 2-D array of packed sequences iterates row by row); the
        row number is the sequence index returned by :meth:`top_k`. Memory grows with the
        number of distinct (sequence, token) pairs, not with the number of tokens.
        ``ignore_ids`` are pad/eos/bos ids left out everywhere. ``vocab_size`` defaults to
        the largest id seen + 1. ``corpus_fingerprint`` identifies the corpus; :meth:`load`
        refuses an index whose fingerprint differs from the caller's.
        """
        _check_build_settings(k1, b, chunk_size, dtype, corpus_fingerprint)
        ignore = np.unique(_as_token_array(list(ignore_ids), "ignore_ids"))
        scores, vocab_size = _score_matrix(token_sequences, ignore, chunk_size=chunk_size,
                                           vocab_size=vocab_size, k1=k1, b=b, dtype=dtype)
        retriever = bm25s.BM25(
            k1=k1,
            b=b,
            method=_BM25S_METHOD,
            idf_method=_BM25S_IDF_METHOD,
            dtype=dtype,
            int_dtype="int32",
            backend="numpy",
        )
        retriever.scores = scores
        retriever.vocab_dict = {}  # columns are model token ids: no string vocabulary
        retriever.unique_token_ids_set = set()
        retriever.nonoccurrence_array = None
        return cls(
            retriever,
            num_sequences=int(scores["num_docs"]),
            vocab_size=int(vocab_size),
            k1=float(k1),
            b=float(b),
            ignore_ids=tuple(int(i) for i in ignore),
            corpus_fingerprint=corpus_fingerprint,
            dtype=dtype,
        )

    # ------------------------------------------------------------------- scoring

    def _query_columns(self, query_token_ids: TokenSequence) -> np.ndarray:
        """Distinct, non-ignored, in-vocabulary query token ids (repeats count once)."""
        query = np.unique(_as_token_array(query_token_ids, "query token ids"))
        if self._ignore.size:
            query = query[~np.isin(query, self._ignore)]
        return query[query < self.vocab_size]

    def scores(self, query_token_ids: TokenSequence) -> np.ndarray:
        """BM25 score of every training sequence for one query, shape ``(C,)`` (docs/method.md §5).

        Each distinct query token counts once; ignored and never-seen tokens add nothing.
        """
        columns = self._query_columns(query_token_ids)
        if columns.size == 0:
            return np.zeros(self.num_sequences, dtype=self.dtype)
        return np.asarray(self._retriever.get_scores_from_ids(columns))

    def top_k(
        self, query_token_ids: TokenSequence, k: int = DEFAULT_TOP_K
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``min(k, C)`` best sequences: ``(indices int64, scores)``, best first.

        Ties are broken by ascending sequence index, so the result is deterministic.
        Sequences sharing no token with the query (score 0) are still returned when
        ``k`` exceeds the number that do.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise DatasleuthError(f"top-k needs an integer k >= 0, got {k!r}; use e.g. 10000")
        scores = self.scores(query_token_ids)
        count = min(int(k), scores.size)
        if count == 0:
            return np.zeros(0, dtype=np.int64), scores[:0].copy()
        if count < scores.size:
            threshold = -np.partition(-scores, count - 1)[count - 1]
            candidates = np.flatnonzero(scores >= threshold)
        else:
            candidates = np.arange(scores.size, dtype=np.int64)
        # lexsort: last key is primary -> descending score, then ascending index.
        order = np.lexsort((candidates, -scores[candidates]))[:count]
        best = candidates[order].astype(np.int64)
        return best, scores[best]

    # ------------------------------------------------------------------- storage

    def _metadata(self, index_dir: str) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "corpus_fingerprint": self.corpus_fingerprint,
            "num_sequences": self.num_sequences,
            "vocab_size": self.vocab_size,
            "nnz": self.nnz,
            "k1": self.k1,
            "b": self.b,
            "ignore_ids": list(self.ignore_ids),
            "query_tokens": "distinct",
            "document_length": "distinct tokens",
            "dtype": self.dtype,
            "index_dir": index_dir,
            "bm25s": {
                "version": bm25s.__version__,
                "method": _BM25S_METHOD,
                "idf_method": _BM25S_IDF_METHOD,
            },
            "formula": (
                "sum over distinct query tokens t in T of "
                "log((C - n_t + 0.5)/(n_t + 0.5) + 1) * (k1 + 1) / (1 + k1 * (1 - b + b * "
                "|T|/avg|T|)), |T| = distinct tokens"
            ),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index to ``directory`` atomically and return the metadata path.

        ``bm25s`` writes its ``.npy``/JSON files into a fresh sub-directory that is renamed
        into place; the metadata JSON (``candidate_filter.json``), replaced last with
        ``os.replace``, names that sub-directory, so a reader sees either the old index or
        the new one in full. The previous sub-directory is then removed.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        meta_path = root / METADATA_NAME
        previous = _read_index_dir(meta_path)

        name = f"bm25s-{uuid.uuid4().hex}"
        staging = root / f".{name}.tmp"
        try:
            self._retriever.save(staging, allow_pickle=False, show_progress=False)
            os.replace(staging, root / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(self._metadata(name), indent=2) + "\n", encoding="utf-8")
        if previous and previous != name and "/" not in previous and previous.startswith("bm25s-"):
            shutil.rmtree(root / previous, ignore_errors=True)
        return meta_path

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        corpus_fingerprint: str | None = None,
        mmap: bool = False,
    ) -> CandidateFilter:
        """Read an index written by :meth:`save`.

        With ``corpus_fingerprint`` given, an index built for another corpus is refused.
        ``mmap=True`` memory-maps the score arrays (``bm25s``'s own option).
        """
        root = Path(directory)
        meta = _read_metadata(root, corpus_fingerprint)
        retriever = _load_retriever(root, meta, mmap)
        return cls(
            retriever,
            num_sequences=int(meta["num_sequences"]),
            vocab_size=int(meta["vocab_size"]),
            k1=float(meta["k1"]),
            b=float(meta["b"]),
            ignore_ids=tuple(int(i) for i in meta["ignore_ids"]),
            corpus_fingerprint=str(meta.get("corpus_fingerprint")),
            dtype=str(meta["dtype"]),
        )


_REBUILD = "rebuild it with CandidateFilter.build(...).save(...)"


def _read_metadata(root: Path, corpus_fingerprint: str | None) -> dict[str, Any]:
    """The checked metadata of the index under ``root`` (format, version, corpus)."""
    meta_path = root / METADATA_NAME
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasleuthError(
            f"no BM25 candidate filter found at {root} ({METADATA_NAME} missing); {_REBUILD}"
        ) from None
    except (OSError, ValueError) as err:
        raise DatasleuthError(
            f"cannot read BM25 candidate filter metadata {meta_path} ({err}); {_REBUILD}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DatasleuthError(f"{meta_path} is not a BM25 candidate filter; {_REBUILD}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasleuthError(
            f"BM25 candidate filter at {root} has format version "
            f"{meta.get('format_version')}, this datasleuth reads {FORMAT_VERSION}; {_REBUILD}"
        )
    stored = meta.get("corpus_fingerprint")
    if corpus_fingerprint is not None and stored != corpus_fingerprint:
        raise DatasleuthError(
            f"BM25 candidate filter at {root} was built for corpus fingerprint {stored!r}, "
            f"not {corpus_fingerprint!r}; rebuild the index for this corpus or point to "
            "the matching index directory"
        )
    index_dir = meta.get("index_dir")
    if not isinstance(index_dir, str) or not index_dir.startswith("bm25s-"):
        raise DatasleuthError(f"{meta_path} names no index directory; {_REBUILD}")
    return meta


def _load_retriever(root: Path, meta: dict[str, Any], mmap: bool) -> bm25s.BM25:
    """The ``bm25s`` retriever the metadata names, checked against the metadata."""
    index_dir = root / meta["index_dir"]
    try:
        retriever = bm25s.BM25.load(index_dir, mmap=mmap, allow_pickle=False,
                                    show_progress=False)
    except (OSError, ValueError, TypeError) as err:
        raise DatasleuthError(
            f"cannot read the BM25 index under {index_dir} ({err}); {_REBUILD}"
        ) from None
    arrays = retriever.scores
    consistent = (
        retriever.method == _BM25S_METHOD
        and retriever.idf_method == _BM25S_IDF_METHOD
        and arrays["num_docs"] == meta["num_sequences"]
        and arrays["indptr"].shape == (meta["vocab_size"] + 1,)
        and int(arrays["indptr"][-1]) == meta["nnz"] == arrays["indices"].size
        and arrays["data"].size == meta["nnz"]
    )
    if not consistent:
        raise DatasleuthError(
            f"BM25 index files under {index_dir} do not match {root / METADATA_NAME}; "
            f"{_REBUILD}"
        )
    retriever.nonoccurrence_array = None
    return retriever


def _read_index_dir(meta_path: Path) -> str | None:
    """The index sub-directory named by existing metadata, or ``None``."""
    try:
        value = json.loads(meta_path.read_text(encoding="utf-8")).get("index_dir")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
