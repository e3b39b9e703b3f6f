"""The scan: every training sequence against every query, top-k kept, details for the top.

One streaming pass scores all packed training sequences (or only BM25 candidates)
against all queries and keeps, per query, the k most positive and most negative
sequences with their per-layer breakdown — the full score matrix is never held
(optionally it is streamed to Parquet). The selected sequences then get token-wise
scores (docs/method.md §6) and the spurious-sequence flag, and everything is returned as
the JSON results document that :mod:`datasleuth.report` renders.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datasleuth.distributed import gather_objects, shard, world
from datasleuth.errors import DatasleuthError
from datasleuth.heads import attention_heads, sequence_head_scores
from datasleuth.lm.corpus import PackedCorpus
from datasleuth.lm.task import CausalLMTask
from datasleuth.progress import snapshot_on_interrupt, stop_requested
from datasleuth.scoring import scan_scores, token_scores
from datasleuth.storage import load_tensors, replace_durably, save_tensors

__all__ = ["TraceConfig", "RunningTopK", "scan_corpus", "trace_details", "sequence_documents",
           "TOKEN_OFFSET_NOTE"]

TOKEN_OFFSET_NOTE = (
    "The heat on token t is the weight update that pairs the layer input at t with the "
    "gradient of predicting token t+1 (and later tokens through attention)."
)
SPURIOUS_RATIO = 2.0 / 3.0


@dataclass(frozen=True)
class TraceConfig:
    """How a trace runs; written into the results document."""

    top_k: int = 20
    bottom_k: int = 10
    batch_size: int = 8
    histogram_bins: int = 40
    histogram_sample: int = 50_000
    power_law: bool = False  # fit a power law to each query's score tail (≈ 0.5 s a query)

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.bottom_k < 0:
            raise DatasleuthError("top_k must be >= 1 and bottom_k >= 0")
        if self.batch_size < 1:
            raise DatasleuthError(f"batch_size must be >= 1, got {self.batch_size}")


class RunningTopK:
    """Per query, the k largest values seen so far with their index and a payload."""

    def __init__(self, n_queries: int, k: int, payload_dim: int, largest: bool = True):
        self.sign = 1.0 if largest else -1.0
        self.k = k
        self.values = torch.full((n_queries, 0), float("-inf"), dtype=torch.float64)
        self.indices = torch.zeros((n_queries, 0), dtype=torch.long)
        self.payload = torch.zeros((n_queries, 0, payload_dim), dtype=torch.float64)

    def update(self, indices: Tensor, scores: Tensor, payload: Tensor, valid: Tensor) -> None:
        """indices (B,), scores (B, Q), payload (B, Q, L), valid (B, Q) bool."""
        v = torch.where(valid.t(), self.sign * scores.t().double(), float("-inf"))  # (Q, B)
        values = torch.cat([self.values, v], 1)
        idx = torch.cat([self.indices, indices[None].expand(v.shape[0], -1).cpu()], 1)
        pay = torch.cat([self.payload, payload.permute(1, 0, 2).double().cpu()], 1)
        self._select(values, idx, pay)

    def merge(self, parts: Sequence[tuple[Tensor, Tensor, Tensor]]) -> None:
        """Keep the best k of several processes' (values, indices, payload) (disjoint rows)."""
        self._select(*(torch.cat([part[j] for part in parts], 1) for j in range(3)))

    def _select(self, values: Tensor, idx: Tensor, pay: Tensor) -> None:
        keep = min(self.k, values.shape[1])
        # stable order: larger value first, then lower index
        order = torch.argsort(idx, dim=1, stable=True)
        values, idx, pay = (values.gather(1, order), idx.gather(1, order),
                            pay.gather(1, order[..., None].expand_as(pay)))
        top = torch.argsort(-values, dim=1, stable=True)[:, :keep]
        self.values = values.gather(1, top)
        self.indices = idx.gather(1, top)
        self.payload = pay.gather(1, top[..., None].expand(-1, -1, pay.shape[2]))

    def results(self, q: int) -> list[tuple[int, float, list[float]]]:
        """(index, score, payload) for query ``q``, best first; never-filled slots dropped."""
        out = []
        for v, i, p in zip(self.values[q], self.indices[q], self.payload[q]):
            if torch.isfinite(v):
                out.append((int(i), float(self.sign * v), p.tolist()))
        return out


@dataclass
class ScanResult:
    """What one streaming pass keeps: top/bottom per query and a histogram sample."""

    top: RunningTopK
    bottom: RunningTopK
    samples: list[list[float]]
    scanned: list[int]
    stats: dict[str, Any] = field(default_factory=dict)


def _subset_loader(corpus: PackedCorpus, indices: Sequence[int], batch_size: int) -> DataLoader:
    return DataLoader(list(int(i) for i in indices), batch_size=batch_size, shuffle=False,
                      collate_fn=corpus.collate)


def _scan_set(corpus: PackedCorpus, candidates: list[np.ndarray] | None, n_queries: int
              ) -> tuple[np.ndarray, Tensor | None]:
    """The sequences to scan (sorted) and, with candidates, which query may score which."""
    if candidates is None:
        union, member = np.arange(len(corpus)), None
    else:
        union = np.unique(np.concatenate([np.asarray(c, dtype=np.int64) for c in candidates]))
        member = torch.zeros(n_queries, len(corpus), dtype=torch.bool)
        for q, c in enumerate(candidates):
            member[q, torch.as_tensor(np.asarray(c, dtype=np.int64))] = True
    if len(union) == 0:
        raise DatasleuthError("there is nothing to scan: the corpus or candidate set is empty")
    return union, member


def _scan_shape(preconditioned: dict[str, Tensor] | None, shape: tuple[int, int] | None
                ) -> tuple[int, int]:
    """(queries, layers) of a scan."""
    if shape is not None:
        return shape
    if preconditioned:
        return next(iter(preconditioned.values())).shape[0], len(preconditioned)
    raise DatasleuthError("scan_corpus needs preconditioned queries or shape=(Q, L)")


def _per_process(key: str, checkpoint: str | Path | None, scores_dir: str | Path | None
                 ) -> tuple[str, str | Path | None, str | Path | None]:
    """This process's checkpoint key, checkpoint file and score folder under torchrun."""
    rank, size = world()
    if size == 1:
        return key, checkpoint, scores_dir
    if checkpoint is not None:
        checkpoint = Path(checkpoint).with_suffix(f".rank{rank}.safetensors")
    if scores_dir is not None:
        scores_dir = Path(scores_dir) / f"rank-{rank:03d}"
    return f"{key}:rank{rank}/{size}", checkpoint, scores_dir


def scan_corpus(
    model: nn.Module,
    preconditioned: dict[str, Tensor] | None,
    corpus: PackedCorpus,
    config: TraceConfig,
    candidates: list[np.ndarray] | None = None,
    scores_dir: str | Path | None = None,
    query_ids: Sequence[str] | None = None,
    scanner: Callable | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_seconds: float = 60.0,
    run_key: str = "",
    shape: tuple[int, int] | None = None,
) -> ScanResult:
    """Score the corpus (or the union of per-query ``candidates``) against all queries.

    ``scanner(model, task, train_loader, on_scores, progress)`` replaces the full-rank
    scan (query batching plugs in here; give ``shape=(queries, layers)`` and
    ``preconditioned=None`` then). ``scores_dir`` streams every score to Parquet
    part files. With ``checkpoint``, the running state is saved every
    ``checkpoint_seconds``; a re-run with the same ``run_key`` resumes after the last
    saved batch instead of starting over.
    """
    n_queries, n_layers = _scan_shape(preconditioned, shape)
    if scanner is None and preconditioned is None:
        raise DatasleuthError("scan_corpus needs preconditioned queries or a scanner")
    union, member = _scan_set(corpus, candidates, n_queries)
    state = _ScanState(n_queries, n_layers, config,
                       stride=max(1, len(union) // config.histogram_sample))
    block = shard(len(union))  # this process's sequences (all of them for one process)
    key, checkpoint, scores_dir = _per_process(
        f"{run_key}:{len(union)}:{int(np.sum(union, dtype=np.int64))}", checkpoint, scores_dir)
    state.position = block.start
    if checkpoint is not None:
        state.restore(checkpoint, key)
    done = state.position
    loader = _subset_loader(corpus, union[done : block.stop], config.batch_size)
    writer = _ParquetParts(scores_dir, query_ids, keep=state.parts) if scores_dir else None
    saver = _Snapshots(state, writer, checkpoint, key, checkpoint_seconds)

    def on_scores(start: int, per_layer: Tensor) -> None:
        start += done
        idx = torch.as_tensor(union[start : start + per_layer.shape[0]])
        total = per_layer.sum(-1)  # (B, Q)
        valid = member[:, idx].t() if member is not None else torch.ones_like(total, dtype=bool)
        state.update(start, idx, total, per_layer, valid)
        if writer is not None:
            writer.write(idx, torch.where(valid, total, float("nan")))
        saver.maybe_save()

    with snapshot_on_interrupt():  # Ctrl-C: the next batch saves the scan, then stops
        if scanner is None:
            scan_scores(model, CausalLMTask(), preconditioned, loader, on_scores, progress)
        else:
            scanner(model, CausalLMTask(), loader, on_scores, progress)
    if writer is not None:
        writer.flush()
    if world()[1] > 1:
        state.merge_processes()
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return ScanResult(state.top, state.bottom, state.samples, state.scanned,
                      {"scanned_sequences": int(len(union)),
                       "resumed_at": int(done - block.start)})


class _Snapshots:
    """Save the scan state (and close the open Parquet part) every ``seconds``."""

    def __init__(self, state: _ScanState, writer: _ParquetParts | None,
                 path: str | Path | None, key: str, seconds: float):
        self.state, self.writer, self.path, self.key = state, writer, path, key
        self.seconds = seconds
        self.last = time.monotonic()

    def maybe_save(self) -> None:
        stop = stop_requested()  # SIGINT/SIGTERM: snapshot now, then stop
        if self.path is None or (not stop and time.monotonic() - self.last < self.seconds):
            if stop:
                raise KeyboardInterrupt
            return
        self.state.parts = self.writer.flush() if self.writer is not None else 0
        self.state.save(self.path, self.key)
        self.last = time.monotonic()
        if stop:
            raise KeyboardInterrupt


class _ScanState:
    """Running top/bottom-k, histogram samples and counts; saved for resuming."""

    def __init__(self, n_queries: int, n_layers: int, config: TraceConfig, stride: int):
        self.top = RunningTopK(n_queries, config.top_k, n_layers, largest=True)
        self.bottom = RunningTopK(n_queries, max(config.bottom_k, 1), n_layers, largest=False)
        self.samples: list[list[float]] = [[] for _ in range(n_queries)]
        self.scanned = [0] * n_queries
        self.position = 0
        self.parts = 0
        self.stride = stride

    def update(self, start: int, idx: Tensor, total: Tensor, per_layer: Tensor,
               valid: Tensor) -> None:
        self.top.update(idx, total, per_layer, valid)
        self.bottom.update(idx, total, per_layer, valid)
        take = (torch.arange(start, start + len(idx)) % self.stride) == 0
        for q in range(total.shape[1]):
            ok = valid[:, q]
            self.scanned[q] += int(ok.sum())
            self.samples[q].extend(total[ok & take, q].tolist())
        self.position = start + len(idx)

    def merge_processes(self) -> None:
        """Combine every process's state (contiguous blocks in rank order) into this one."""
        parts = gather_objects(((self.top.values, self.top.indices, self.top.payload),
                                (self.bottom.values, self.bottom.indices, self.bottom.payload),
                                self.samples, self.scanned))
        self.top.merge([part[0] for part in parts])
        self.bottom.merge([part[1] for part in parts])
        self.samples = [[x for part in parts for x in part[2][q]]
                        for q in range(len(self.samples))]
        self.scanned = [sum(part[3][q] for part in parts) for q in range(len(self.scanned))]

    def save(self, path: str | Path, key: str) -> None:
        tensors = {}
        for name, tk in (("top", self.top), ("bottom", self.bottom)):
            tensors.update({f"{name}.values": tk.values, f"{name}.indices": tk.indices,
                            f"{name}.payload": tk.payload})
        for q, sample in enumerate(self.samples):
            tensors[f"sample.{q}"] = torch.tensor(sample, dtype=torch.float64)
        meta = {"key": key, "position": self.position, "parts": self.parts,
                "scanned": self.scanned}
        save_tensors(path, tensors, meta)

    def restore(self, path: str | Path, key: str) -> None:
        if not Path(path).is_file():
            return
        tensors, meta = load_tensors(path)
        if meta.get("key") != key:
            return  # a checkpoint of another run: start over
        for name, tk in (("top", self.top), ("bottom", self.bottom)):
            tk.values = tensors[f"{name}.values"]
            tk.indices = tensors[f"{name}.indices"]
            tk.payload = tensors[f"{name}.payload"]
        self.samples = [tensors[f"sample.{q}"].tolist() for q in range(len(self.samples))]
        self.scanned = list(meta["scanned"])
        self.position = int(meta["position"])
        self.parts = int(meta["parts"])


class _ParquetParts:
    """All scores streamed to ``dir/part-NNNNN.parquet`` (sequence + one column per query).

    A part is closed (renamed into place) at every checkpoint, so a resumed scan keeps
    the parts written before its checkpoint and drops everything after.
    """

    def __init__(self, directory: str | Path, query_ids: Sequence[str] | None, keep: int = 0):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("*part-*.parquet*"):
            number = int(old.name.split("part-")[1][:5])
            if number >= keep or old.name.startswith("."):
                old.unlink()
        self.next_part = keep
        self.names = [f"query:{q}" for q in query_ids] if query_ids else None
        self._pa, self._pq = pa, pq
        self.writer = None
        self.tmp: Path | None = None

    def write(self, idx: Tensor, scores: Tensor) -> None:
        names = self.names or [f"query:{q}" for q in range(scores.shape[1])]
        cols = {"sequence": self._pa.array(idx.numpy().astype(np.int64))}
        for q, name in enumerate(names):
            cols[name] = self._pa.array(scores[:, q].float().numpy())
        table = self._pa.table(cols)
        if self.writer is None:
            self.tmp = self.dir / f".part-{self.next_part:05d}.parquet.partial"
            self.writer = self._pq.ParquetWriter(str(self.tmp), table.schema)
        self.writer.write_table(table)

    def flush(self) -> int:
        """Close the open part into place; return the number of finished parts."""
        if self.writer is not None:
            self.writer.close()
            replace_durably(self.tmp, self.dir / f"part-{self.next_part:05d}.parquet")
            self.writer = None
            self.next_part += 1
        return self.next_part


def _histogram(sample: list[float], bins: int) -> dict[str, list]:
    if not sample:
        return {"edges": [0.0, 1.0], "counts": [0]}
    counts, edges = np.histogram(np.asarray(sample, dtype=np.float64), bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _sparsity(sample: list[float], power_law: bool, max_fit: int = 2000) -> dict[str, Any]:
    """Heavy-tail summary of a query's scores (docs/method.md §8) from the scan's uniform sample.

    ``top_share``: share of the positive influence held by the top 0.1%, 1% and 10% of
    sequences. With ``power_law``, a Clauset et al. fit on at most ``max_fit`` evenly
    spaced points of the sample (the fit's cost grows quickly with its size).
    """
    from datasleuth.evaluation.sparsity import MIN_TAIL_POINTS, fit_power_law, top_share

    out: dict[str, Any] = {"n_sample": len(sample), "top_share": None, "power_law": None}
    arr = np.asarray(sample, dtype=np.float64)
    if arr.size and (arr > 0).any():
        out["top_share"] = {str(f): float(top_share(arr, f)) for f in (0.001, 0.01, 0.1)}
    if power_law:
        thin = arr[:: max(1, arr.size // max_fit)]
        if (thin > 0).sum() >= MIN_TAIL_POINTS:
            fit = fit_power_law(thin)
            out["power_law"] = {"alpha": fit.alpha, "xmin": fit.xmin,
                                "ks_distance": fit.ks_distance, "n_tail": fit.n_tail,
                                "lognormal_R": fit.lognormal_R, "lognormal_p": fit.lognormal_p}
    return out


def _token_heat(model: nn.Module, preconditioned: dict[str, Tensor], corpus: PackedCorpus,
                indices: list[int], batch_size: int) -> dict[int, Tensor]:
    """Token-wise scores of the given sequences: index -> (Q, T) summed over layers."""
    tokens: dict[int, Tensor] = {}
    for start in range(0, len(indices), batch_size):
        part = indices[start : start + batch_size]
        ts = token_scores(model, CausalLMTask(), preconditioned,
                          corpus.collate(part))  # (B, Q, T, L)
        for j, i in enumerate(part):
            tokens[i] = ts[j].sum(-1).cpu()
    return tokens


def _head_rows(model: nn.Module, preconditioned: dict[str, Tensor], corpus: PackedCorpus,
               indices: list[int], batch_size: int) -> tuple[dict[int, dict], dict]:
    """Per-head scores of the selected sequences for the attention layers (datasleuth.heads):
    ({index: {layer: (Q, H)}}, {layer: head labels})."""
    splits = attention_heads(model, list(preconditioned))
    if not splits or not indices:
        return {}, {}
    loader = [corpus.collate(indices[s : s + batch_size])
              for s in range(0, len(indices), batch_size)]
    per = sequence_head_scores(model, CausalLMTask(), preconditioned, loader, splits)
    rows = {i: {name: per[name][j] for name in per} for j, i in enumerate(indices)}
    return rows, {name: split.labels for name, split in splits.items()}


def _heads_of(heads: dict[int, dict], i: int, q: int) -> dict[str, Any]:
    """A result row's ``head_scores``: {layer: [score per head]} for query ``q``."""
    if i not in heads:
        return {}
    return {"head_scores": {name: [float(x) for x in v[q]] for name, v in heads[i].items()}}


def sequence_documents(corpus: PackedCorpus, i: int) -> list[dict[str, Any]]:
    """The documents sequence ``i`` was cut from, first piece of each, in order: doc_index,
    the characters of the piece and the corpus's own columns (``id``, ``title``...)."""
    docs, seen = [], set()
    for seg in corpus.segments(i):
        if seg.doc_index not in seen:
            seen.add(seg.doc_index)
            docs.append({**corpus.document_fields(seg.doc_index),
                         "doc_index": int(seg.doc_index), "char_start": int(seg.char_start),
                         "char_end": int(seg.char_end)})
    return docs


def _sequence_row(corpus: PackedCorpus, heat: Tensor, rank: int, i: int, score: float,
                  layers: list[float], note: str = TOKEN_OFFSET_NOTE) -> dict[str, Any]:
    """One selected sequence of one query in the results document; ``heat`` is (T,)."""
    pieces = corpus.token_pieces(i)
    a = heat[: len(pieces)].double()
    l1 = float(a.abs().sum())
    ratio = float(a.norm()) / l1 if l1 > 0 else 0.0
    return {
        "rank": rank, "index": int(i), "score": float(score),
        "layer_scores": [float(x) for x in layers], "documents": sequence_documents(corpus, i),
        "tokens": [p for p, _, _ in pieces], "token_scores": a.tolist(),
        "spurious": ratio > SPURIOUS_RATIO, "token_offset_note": note,
    }


def trace_details(
    model: nn.Module,
    preconditioned: dict[str, Tensor],
    corpus: PackedCorpus,
    scan: ScanResult,
    queries: list[dict[str, Any]],
    config: TraceConfig,
    header: dict[str, Any],
    rescored: bool = False,
    heat: Callable[[list[int]], dict[int, Tensor]] | None = None,
    note: str = TOKEN_OFFSET_NOTE,
) -> dict[str, Any]:
    """Token-wise scores for the selected sequences and the results document (report schema).

    A baseline method gives its own token scores ``heat(indices) -> {index: (Q, T)}`` and
    their ``note``; ``preconditioned`` then only names the layers of the scan's payload
    (none: no per-layer scores).
    """
    layer_names = list(preconditioned)
    chosen = [scan.top.results(q) + scan.bottom.results(q)[: config.bottom_k]
              for q in range(len(queries))]
    needed = sorted({i for rows in chosen for i, _, _ in rows})
    tokens = (heat(needed) if heat is not None
              else _token_heat(model, preconditioned, corpus, needed, config.batch_size))
    heads, head_labels = ({}, {}) if heat is not None else _head_rows(
        model, preconditioned, corpus, needed, config.batch_size)
    out_queries = []
    for q, query in enumerate(queries):
        top_rows = scan.top.results(q)
        bottom_rows = scan.bottom.results(q)[: config.bottom_k] if config.bottom_k else []
        out_queries.append({
            "id": str(query["id"]),
            "prompt": query["prompt"],
            "completion": query["completion"],
            "completion_tokens": list(query.get("completion_tokens", [])),
            "score_histogram": _histogram(scan.samples[q], config.histogram_bins),
            "sparsity": _sparsity(scan.samples[q], config.power_law),
            "n_scanned": int(scan.scanned[q]),
            "layer_names": layer_names,
            "top": [_sequence_row(corpus, tokens[i][q], r + 1, i, s, ly if layer_names else [],
                                  note) | _heads_of(heads, i, q)
                    for r, (i, s, ly) in enumerate(top_rows)],
            "bottom": [_sequence_row(corpus, tokens[i][q], r + 1, i, s,
                                     ly if layer_names else [], note) | _heads_of(heads, i, q)
                       for r, (i, s, ly) in enumerate(bottom_rows)],
        } | ({"head_labels": head_labels} if head_labels else {}))
    doc = {
        "format_version": 1,
        "tool": "datasleuth",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "warnings": [],
        "config": {"trace": asdict(config), "rescored_full_rank": rescored},
        "queries": out_queries,
    }
    doc.update(header)
    return doc
