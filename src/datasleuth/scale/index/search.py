"""Top-k search over an index's rows: exact in blocks, or approximate with FAISS (§7).

Exact search reads the shards memory-mapped (:func:`datasleuth.storage.memmap_safetensors`)
in blocks of rows, multiplies the queries with each block and keeps a running
``torch.topk`` merge, so memory is one block however many rows there are.

Approximate search hands the rows to a FAISS inner-product index, chosen by size
(:func:`choose_method`): an HNSW graph for small indices, an inverted file (IVF, exact
vectors) for mid-sized ones, an inverted file of product-quantised codes (IVF-PQ) for
millions of rows. It is built shard by shard (bounded memory), saved beside the shards,
and extended in place when shards are appended. Candidates are re-scored from the rows
on disk, so the returned scores are the true scores of the returned rows.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from datasleuth.errors import DatasleuthError
from datasleuth.storage import atomic_path, read_json, write_json

if TYPE_CHECKING:
    from datasleuth.scale.index.store import GradientIndex

__all__ = ["ANN_METHODS", "approximate_search", "choose_method", "exact_search"]

ANN_METHODS = ("auto", "hnsw", "ivf", "ivfpq")
HNSW_MAX_ROWS = 50_000
IVF_MAX_ROWS = 500_000
_TRAIN_PER_LIST = 64  # training rows per inverted list (FAISS warns under 39)
MAX_NLIST = 1024  # bounds k-means training time; ~1000 rows per list at 10⁶ rows


def exact_search(index: GradientIndex, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` rows per query by blocked products over memory-mapped shards."""
    best_s = q.new_empty(q.shape[0], 0)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long)
    for start, rows in index.iter_blocks(q.dtype):
        s = q @ rows.t()  # (Q, n)
        block = torch.topk(s, min(k, s.shape[1]), dim=1)  # the block's best, then merge
        top = torch.topk(torch.cat([best_s, block.values], 1),
                         min(k, best_s.shape[1] + block.values.shape[1]), dim=1)
        best_s = top.values
        best_i = torch.cat([best_i, block.indices + start], 1).gather(1, top.indices)
    return best_i, best_s


def choose_method(rows: int) -> str:
    """HNSW below 50k rows, IVF below 500k, IVF-PQ above (memory: PQ codes only)."""
    if rows < HNSW_MAX_ROWS:
        return "hnsw"
    return "ivf" if rows < IVF_MAX_ROWS else "ivfpq"


def approximate_search(
    index: GradientIndex, q: Tensor, k: int, method: str = "auto",
    nprobe: int | None = None, ef_search: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` candidates per query from a FAISS index over the rows (:class:`_AnnIndex`),
    re-scored exactly from the stored rows."""
    if method not in ANN_METHODS:
        raise DatasleuthError(f"method must be one of {', '.join(ANN_METHODS)}, "
                              f"not {method!r}")
    if method == "auto":
        method = choose_method(index.rows)
    ann = _AnnIndex.load_or_build(index, method)
    ids = ann.candidates(q, k, nprobe=nprobe, ef_search=ef_search)  # (Q, k') int64, -1 = none
    valid = ids >= 0
    vec = index.gather_rows(ids.clamp_min(0).reshape(-1), q.dtype).reshape(*ids.shape, -1)
    scores = torch.einsum("qkd,qd->qk", vec, q)  # exact re-score of the candidates
    scores = torch.where(valid, scores, torch.full_like(scores, -math.inf))
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    return ids.gather(1, top.indices), top.values


def _default_nlist(n: int) -> int:
    """4·√N inverted lists (at most 1024), at least 39 training points per list (FAISS)."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39, MAX_NLIST))


def _pq_parts(d: int) -> int:
    """Sub-quantisers of IVF-PQ: the largest divisor of D with ≥ 4 dimensions each, ≤ 64."""
    return max(m for m in range(1, min(64, d) + 1) if d % m == 0 and (d // m >= 4 or m == 1))


class _AnnIndex:
    """Approximate maximum-inner-product search with FAISS (``METRIC_INNER_PRODUCT``).

    ``"hnsw"``: a navigable small-world graph (M = 32, efConstruction 80, efSearch
    max(128, 2k)); no training, high recall on unstructured rows. ``"ivf"``: an
    inverted file with nlist from N (:func:`_default_nlist`), trained on up to 64 rows
    per list taken evenly over the shards, searched in ``nprobe`` = nlist/8 lists by
    default. ``"ivfpq"``: the same lists holding product-quantised codes (8 bits per
    sub-quantiser), 4k candidates fetched and re-scored exactly. IVF indices are
    retrained from scratch once the rows outgrow 8× those they were trained for.
    """

    def __init__(self, index: Any, method: str, meta: dict):
        self.index = index
        self.method = method
        self.meta = meta

    @staticmethod
    def _key(gi: GradientIndex, method: str) -> str:
        return hashlib.sha256(f"{gi.fingerprint}|{gi.dim}|{method}".encode()).hexdigest()[:32]

    @staticmethod
    def _shard_ids(gi: GradientIndex) -> list[str]:
        return [f"{s['file']}:{s['start']}:{s['stop']}" for s in gi.shards]

    @classmethod
    def load_or_build(cls, gi: GradientIndex, method: str) -> _AnnIndex:
        import faiss

        path, meta_path = gi.directory / f"ann_{method}.faiss", gi.directory / f"ann_{method}.json"
        shards = cls._shard_ids(gi)
        ann = None
        if path.is_file() and meta_path.is_file():
            meta = read_json(meta_path)
            covered = meta.get("shards", [])
            fresh = meta.get("key") == cls._key(gi, method) and covered == shards[:len(covered)]
            if fresh and gi.rows <= 8 * max(meta.get("trained_rows", gi.rows), 1):
                ann = cls(faiss.read_index(str(path)), method, meta)
                if len(covered) == len(shards):
                    return ann
        if ann is None:
            ann = cls._new(gi, method)
        ann._add(gi, len(ann.meta["shards"]), shards)
        with atomic_path(path) as tmp:
            faiss.write_index(ann.index, str(tmp))
        write_json(meta_path, ann.meta)
        return ann

    @classmethod
    def _new(cls, gi: GradientIndex, method: str) -> _AnnIndex:
        import faiss

        d, n = gi.dim, gi.rows
        meta: dict[str, Any] = {"key": cls._key(gi, method), "method": method, "shards": [],
                                "trained_rows": n}
        if method == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            meta.update(M=32, ef_construction=80, ef_search=128)
            return cls(index, method, meta)
        nlist = _default_nlist(n)
        quantizer = faiss.IndexFlatIP(d)
        if method == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m = _pq_parts(d)
            index = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            meta.update(pq_parts=m)
        train = gi.sample_rows(min(n, max(nlist * _TRAIN_PER_LIST, 256 if method == "ivfpq"
                                          else 1)))
        index.train(np.ascontiguousarray(train.numpy()))
        index.quantizer_trains_alone = 0
        meta.update(nlist=nlist, nprobe=max(1, int(math.ceil(nlist / 8))))
        return cls(index, method, meta)

    def _add(self, gi: GradientIndex, first: int, shards: list[str]) -> None:
        """Add shards ``first..`` of ``gi`` (ids = global row numbers), one at a time."""
        for shard, sid in zip(gi.shards[first:], shards[first:]):
            for start, rows in gi.iter_blocks(torch.float32, shards=[shard]):
                x = np.ascontiguousarray(rows.numpy())
                if self.method == "hnsw":
                    if start != self.index.ntotal:
                        raise DatasleuthError("the HNSW index is out of step with the shards; "
                                              f"delete {gi.directory}/ann_hnsw.* and search again")
                    self.index.add(x)
                else:
                    self.index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
            self.meta["shards"].append(sid)
        self.meta["rows"] = gi.rows

    def candidates(self, q: Tensor, k: int, nprobe: int | None = None,
                   ef_search: int | None = None) -> Tensor:
        """(Q, k') row ids (k' = k, or 4k for IVF-PQ), -1 where fewer were found."""
        qf = np.ascontiguousarray(q.to(torch.float32).numpy())  # (Q, D)
        fetch = k
        if self.method == "hnsw":
            self.index.hnsw.efSearch = int(ef_search or max(self.meta["ef_search"], 2 * k))
        else:
            self.index.nprobe = int(nprobe or self.meta["nprobe"])
            if self.method == "ivfpq":
                fetch = min(4 * k, self.index.ntotal)
        _, ids = self.index.search(qf, fetch)
        return torch.from_numpy(ids.astype(np.int64))
