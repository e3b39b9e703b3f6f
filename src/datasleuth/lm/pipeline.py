"""Steps of the language-model workflow with reuse of finished artifacts.

A work directory holds what each step produces::

    WORKDIR/corpus/                    packed training sequences (lm.corpus)
    WORKDIR/factors-<kind>.safetensors fitted curvature, metadata names model/corpus/config
    WORKDIR/.fit-<kind>.checkpoint...  running sums of an unfinished fit (resumed, then removed)
    WORKDIR/bm25/                      the candidate filter's index (if used)
    INDEX/                             a projected-gradient index (`datasleuth index`)
    OUT/results.json, OUT/report.html  what `trace` found

A step whose artifact exists and whose metadata still matches (same model fingerprint,
corpus fingerprint and configuration) is skipped; anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datasleuth.curvature import Curvature
from datasleuth.distributed import active, barrier, gather_objects, rank_zero_first, shard, world
from datasleuth.errors import DatasleuthError
from datasleuth.fitting import FitConfig, fit_curvature
from datasleuth.layers import TrackedLayer
from datasleuth.lm.corpus import PackedCorpus, pack_corpus
from datasleuth.lm.model import context_length
from datasleuth.lm.queries import Query, collate_queries, encode_queries, load_queries
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import TraceConfig, scan_corpus, trace_details
from datasleuth.progress import progress_bar
from datasleuth.scoring import precondition_queries
from datasleuth.storage import atomic_path, load_curvature, read_json, write_json

if TYPE_CHECKING:
    from datasleuth.scale.index import GradientIndex, IndexConfig

__all__ = [
    "prepare_corpus",
    "fit_factors",
    "query_batches",
    "bm25_candidates",
    "build_corpus_index",
    "check_context",
    "check_trace_options",
    "open_corpus_index",
    "run_trace",
    "run_self_influence",
    "say",
]

DEFAULT_RESCORE = 100
_INDEX_CORPUS = "corpus.json"


def say(message: str) -> None:
    """One status line on stderr (stdout is kept for results); rank 0 only."""
    if world()[0] == 0:
        print(message, file=sys.stderr, flush=True)


def prepare_corpus(
    corpus_path: str | Path | Sequence[str],
    tokenizer: Any,
    workdir: str | Path,
    seq_len: int = 512,
    text_field: str = "text",
    progress: bool = True,
    streaming: bool = False,
) -> PackedCorpus:
    """Pack the corpus into ``workdir/corpus``, or reuse a packing of the same inputs.

    ``streaming`` reads the files as a stream instead of through the ``datasets`` Arrow
    cache (which copies the corpus to disk once); the packing is the same.
    """
    target = Path(workdir) / "corpus"
    with rank_zero_first():  # under torchrun, rank 0 packs and the others reuse it
        if PackedCorpus.matches(target, corpus_path, tokenizer, seq_len, text_field=text_field):
            try:
                corpus = PackedCorpus.load(target)
                if len(corpus):
                    corpus.input_ids(len(corpus) - 1)  # opens the token file: damaged?
                say(f"reusing packed corpus {target} ({len(corpus)} sequences of {seq_len} "
                    "tokens)")
                return corpus
            except DatasleuthError as e:
                say(f"packing again: {e}")
        corpus = pack_corpus(corpus_path, tokenizer, seq_len=seq_len, output_dir=target,
                             progress=progress, text_field=text_field, streaming=streaming)
        say(f"packed {corpus.num_documents} documents into {len(corpus)} sequences of "
            f"{seq_len} tokens -> {target}")
        return corpus


def check_context(model: nn.Module, seq_len: int) -> None:
    """Refuse sequences of ``seq_len`` tokens longer than the model's context."""
    limit = context_length(model)
    if limit is not None and seq_len > limit:
        raise DatasleuthError(f"--seq-len {seq_len} is longer than the model's context of "
                              f"{limit} tokens; pass --seq-len {limit} or less")


def _corpus_loader(corpus: PackedCorpus, batch_size: int, limit: int | None) -> DataLoader:
    """This process's block of the first ``limit`` sequences (all of them alone)."""
    n = len(corpus) if limit is None else min(limit, len(corpus))
    return DataLoader(list(shard(n)), batch_size=batch_size, collate_fn=corpus.collate)


def fit_factors(
    model: nn.Module,
    layers: list[TrackedLayer],
    corpus: PackedCorpus,
    workdir: str | Path,
    config: FitConfig,
    batch_size: int = 8,
    max_sequences: int | None = None,
    progress: bool = True,
) -> Curvature:
    """Fit curvature on the packed corpus, or reuse ``workdir/factors-<kind>.safetensors``."""
    check_context(model, corpus.seq_len)
    path = Path(workdir) / f"factors-{config.curvature}.safetensors"
    expect = {"config": asdict(config), "corpus_fingerprint": corpus.fingerprint,
              "max_sequences": max_sequences}
    if path.is_file():
        try:
            curvature = load_curvature(path, model, layers, expect=expect)
            say(f"reusing fitted {config.curvature} factors {path}")
            return curvature
        except DatasleuthError as e:
            say(f"re-fitting: {e}")
    loader = _corpus_loader(corpus, batch_size, max_sequences)
    rank, size = world()
    snapshot = Path(workdir) / (f".fit-{config.curvature}.checkpoint" +
                                (f".rank{rank}" if size > 1 else "") + ".safetensors")
    if snapshot.is_file():
        say(f"resuming the fit from {snapshot} if it matches")
    curvature = fit_curvature(model, CausalLMTask(), loader, layers, config, progress=progress,
                              checkpoint=snapshot, checkpoint_seconds=60.0,
                              checkpoint_key=f"{corpus.fingerprint}:{max_sequences}:{batch_size}")
    curvature.metadata.update(corpus_fingerprint=corpus.fingerprint, max_sequences=max_sequences)
    if world()[0] == 0:
        curvature.save(path)
    barrier()
    say(f"fitted {config.curvature} on {curvature.metadata['sequences']} sequences, "
        f"{len(layers)} layers -> {path}")
    return curvature


def query_batches(
    queries: list[Query], tokenizer: Any, batch_size: int, max_length: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, torch.Tensor]]]:
    """Encoded queries and their padded batches."""
    encoded = encode_queries(queries, tokenizer, max_length=max_length)
    batches = [collate_queries(encoded[i : i + batch_size])
               for i in range(0, len(encoded), batch_size)]
    return encoded, batches


def bm25_candidates(
    corpus: PackedCorpus,
    encoded: list[dict[str, Any]],
    workdir: str | Path,
    k: int,
    ignore_ids: Sequence[int] = (),
) -> list[np.ndarray]:
    """Per query, the top-k sequences by the BM25 variant of METHOD.md §5 (index reused)."""
    from datasleuth.scale.bm25 import CandidateFilter

    directory = Path(workdir) / "bm25"
    try:
        filt = CandidateFilter.load(directory, corpus_fingerprint=corpus.fingerprint)
        say(f"reusing BM25 index {directory}")
    except DatasleuthError:
        rows = (corpus.input_ids(i)[: corpus.length(i)].numpy() for i in range(len(corpus)))
        filt = CandidateFilter.build(rows, ignore_ids=ignore_ids,
                                     corpus_fingerprint=corpus.fingerprint)
        filt.save(directory)
        say(f"built BM25 index over {len(corpus)} sequences -> {directory}")
    return [filt.top_k(e["input_ids"].tolist(), k=k)[0] for e in encoded]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def build_corpus_index(
    model: nn.Module,
    layers: list[TrackedLayer],
    corpus: PackedCorpus,
    directory: str | Path,
    config: IndexConfig | None = None,
    *,
    batch_size: int = 8,
    fisher: str = "sampled",
    max_sequences: int | None = None,
    progress: bool = True,
) -> GradientIndex:
    """Index every packed sequence's projected gradient and fit the projected curvature.

    METHOD.md §7 (Choe et al. 2024). A killed build resumes at its first unfinished
    shard; a finished index of the same model, layers, projection and corpus is reused.
    """
    from datasleuth.scale.index import IndexConfig, build_index, fit_projected_curvature

    if active():
        raise DatasleuthError("`datasleuth index` runs in one process; start it without "
                              "torchrun (trace --index may use many)")
    check_context(model, corpus.seq_len)
    directory = Path(directory)
    side = directory / _INDEX_CORPUS
    if side.is_file():
        if read_json(side).get("corpus_fingerprint") != corpus.fingerprint:
            raise DatasleuthError(f"{directory} indexes a different corpus or packing; pass a "
                                  f"new --out folder or delete {directory}")
    elif directory.is_dir() and any(directory.iterdir()):
        raise DatasleuthError(f"{directory} is not empty and holds no datasleuth index; pass a "
                              "new or empty --out folder")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(side, {"corpus_fingerprint": corpus.fingerprint, "sequences": len(corpus)})
    task = CausalLMTask()
    index = build_index(model, task, corpus.as_torch_dataset(), layers, directory,
                        config or IndexConfig(), batch_size=batch_size,
                        collate_fn=corpus.collate, progress=progress)
    n_fit = len(corpus) if max_sequences is None else min(max_sequences, len(corpus))
    meta = index.curvature.metadata if index.curvature is not None else {}
    if meta.get("fisher") == fisher and meta.get("sequences") == n_fit:
        say(f"reusing the projected curvature of {directory}")
    else:
        fit_projected_curvature(model, task, _corpus_loader(corpus, batch_size, max_sequences),
                                index, fisher=fisher, progress=progress)
    say(f"index {directory}: {index.rows} sequences x {index.dim} numbers "
        f"({index.bytes_per_row} bytes per sequence, {len(index.layer_names)} layers)")
    return index


def open_corpus_index(directory: str | Path, model: nn.Module, corpus: PackedCorpus
                      ) -> GradientIndex:
    """Open an index made by :func:`build_corpus_index`; refuse another model or corpus."""
    from datasleuth.scale.index import GradientIndex

    directory = Path(directory)
    side = directory / _INDEX_CORPUS
    if not side.is_file():
        raise DatasleuthError(f"{directory} holds no datasleuth index; build one with "
                              "`datasleuth index --out DIR`")
    index = GradientIndex.open(directory, model)
    if read_json(side).get("corpus_fingerprint") != corpus.fingerprint or \
            index.rows != len(corpus):
        raise DatasleuthError(f"{directory} indexes a different corpus or packing than "
                              f"--corpus/--seq-len ({index.rows} rows, corpus has {len(corpus)}); "
                              "rebuild it with `datasleuth index`")
    if index.curvature is None:
        raise DatasleuthError(f"{directory} has no projected curvature (its build was "
                              "interrupted); re-run `datasleuth index` to finish it")
    return index


def _index_candidates(
    index: GradientIndex, model: nn.Module, batches: list[dict[str, torch.Tensor]], n: int,
    bottom: bool, approximate: bool, sample: int,
) -> tuple[list[np.ndarray], list[list[float]], list[int]]:
    """Per query, the rows of the ``n`` highest (and lowest) index scores; a score sample."""
    q = index.precondition_queries(model, CausalLMTask(), batches)  # (Q, D)
    top, _ = index.search(q, k=n, exact=not approximate)
    lists = [top[j].numpy() for j in range(q.shape[0])]
    if bottom:
        low, _ = index.search(-q, k=n, exact=not approximate)
        lists = [np.union1d(a, low[j].numpy()) for j, a in enumerate(lists)]
    stride = max(1, index.rows // sample)
    samples: list[list[float]] = [[] for _ in range(q.shape[0])]
    for start, rows in index.iter_shards(q.dtype):
        part = q @ rows[(-start) % stride :: stride].t()  # (Q, n_sampled)
        for j in range(q.shape[0]):
            samples[j].extend(part[j].tolist())
    return lists, samples, [index.rows] * q.shape[0]


def _rescore_by_chunks(
    model: nn.Module, curvature: Curvature, corpus: PackedCorpus,
    batches: list[dict[str, torch.Tensor]], candidates: list[np.ndarray],
    rows: list[dict[str, Any]], config: TraceConfig, header: dict[str, Any],
    samples: list[list[float]], scanned: list[int], progress: bool,
) -> dict[str, Any]:
    """Full-rank EK-FAC scores of each query's candidates, one query batch at a time.

    The last step of query batching (METHOD.md §4): only one batch of full-rank
    preconditioned query gradients is held at once. Histogram and counts come from the
    first stage, which saw every sequence.
    """
    doc: dict[str, Any] | None = None
    first = 0
    for batch in progress_bar(batches, desc="re-score (full rank)", enabled=progress,
                              unit="query batch"):
        nq = int(batch["input_ids"].shape[0])
        pre = precondition_queries(model, CausalLMTask(), curvature, [batch])
        part = slice(first, first + nq)
        scan = scan_corpus(model, pre, corpus, config, candidates=candidates[part],
                           progress=False)
        scan.samples, scan.scanned = samples[part], scanned[part]
        chunk = trace_details(model, pre, corpus, scan, rows[part], config, header,
                              rescored=True)
        if doc is None:
            doc = chunk
        else:
            doc["queries"].extend(chunk["queries"])
        first += nq
    assert doc is not None
    return doc


def check_trace_options(rank: int | None, index: str | Path | None,
                        candidates_k: int | None, rescore: int, approximate: bool) -> None:
    """Refuse combinations of the candidate stages that do not go together."""
    if index is not None and (rank is not None or candidates_k is not None):
        raise DatasleuthError("--index finds candidates by itself; drop --rank and --filter")
    if approximate and index is None:
        raise DatasleuthError("--approximate only applies to --index DIR; add --index")
    if rank is not None and rank < 1:
        raise DatasleuthError(f"rank must be >= 1, got {rank}")
    if rescore < 1:
        raise DatasleuthError(f"rescore must be >= 1, got {rescore}")


def run_trace(
    model: nn.Module,
    tokenizer: Any,
    corpus: PackedCorpus,
    curvature: Curvature,
    queries_path: str | Path,
    out_dir: str | Path,
    config: TraceConfig,
    *,
    model_name: str = "",
    corpus_name: str = "",
    candidates_k: int | None = None,
    workdir: str | Path | None = None,
    all_scores: bool = False,
    rank: int | None = None,
    index: str | Path | None = None,
    rescore: int = DEFAULT_RESCORE,
    approximate: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Trace every query through the corpus; write results.json (reused if inputs match).

    Three ways to find each query's candidates, all ending in exact scores:

    * default: every sequence scored with full-rank preconditioned query gradients;
    * ``rank=k``: query batching (METHOD.md §4) -- one pass with rank-k query gradients,
      then each query's ``rescore`` best and worst sequences scored again at full rank;
    * ``index=DIR``: search a projected-gradient index (METHOD.md §7) for ``rescore``
      candidates per query (exact, or FAISS with ``approximate``), then score those
      with full EK-FAC.

    ``candidates_k`` restricts the scan (or the low-rank pass) to the BM25 top-k per
    query (METHOD.md §5). A killed full or low-rank scan resumes from its checkpoint
    when re-run with the same inputs.
    """
    check_trace_options(rank, index, candidates_k, rescore, approximate)
    rescore = max(rescore, config.top_k, config.bottom_k)
    out = Path(out_dir)
    queries = load_queries(queries_path)
    staged = rank is not None or index is not None
    index_obj = open_corpus_index(index, model, corpus) if index is not None else None
    key = _digest({
        "queries": [asdict(q) for q in queries], "corpus": corpus.fingerprint,
        "factors": curvature.metadata.get("fingerprint"), "config": asdict(config),
        "curvature": curvature.metadata.get("config"), "candidates_k": candidates_k,
        "all_scores": all_scores, "rank": rank, "rescore": rescore if staged else None,
        "index": index_obj.manifest if index_obj is not None else None,
        "approximate": approximate,
    })
    results_path = out / "results.json"
    if results_path.is_file():
        try:
            previous = read_json(results_path)
        except DatasleuthError:
            previous = {}
        if previous.get("input_digest") == key:
            say(f"reusing {results_path} (same model, corpus, factors, queries and settings)")
            return previous
    check_context(model, corpus.seq_len)
    encoded, batches = query_batches(queries, tokenizer, config.batch_size,
                                     max_length=context_length(model))
    warnings = []
    candidates = None
    if candidates_k is not None:
        from datasleuth.scale.bm25 import FILTER_WARNING

        ignore = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
        with rank_zero_first():
            candidates = bm25_candidates(corpus, encoded, workdir or out, candidates_k, ignore)
        warnings.append(f"{FILTER_WARNING} (top {candidates_k} per query)")
        say(f"warning: {warnings[-1]}")
    rows = [{"id": q.id, "prompt": q.prompt, "completion": q.completion,
             "completion_tokens": e.get("completion_tokens", [])}
            for q, e in zip(queries, encoded)]
    header = {"model": model_name, "corpus": corpus_name, "input_digest": key}
    scores_dir = out / "scores" if all_scores else None
    checkpoint = out / ".scan-checkpoint.safetensors"
    stage: dict[str, Any] = {"kind": "full"}
    if not staged:
        pre = precondition_queries(model, CausalLMTask(), curvature, batches)
        scan = scan_corpus(model, pre, corpus, config, candidates=candidates,
                           scores_dir=scores_dir, query_ids=[q.id for q in queries],
                           progress=progress, checkpoint=checkpoint, run_key=key)
        if scan.stats["resumed_at"]:
            say(f"resumed the scan after {scan.stats['resumed_at']} sequences")
        results = trace_details(model, pre, corpus, scan, rows, config, header)
    else:
        if index_obj is not None:
            if all_scores:
                raise DatasleuthError("--all-scores needs a scan of every sequence; drop --index")
            lists, samples, scanned = _index_candidates(
                index_obj, model, batches, rescore, config.bottom_k > 0, approximate,
                config.histogram_sample)
            stage = {"kind": "index", "index": str(index), "approximate": approximate,
                     "rescored_per_query": rescore}
            say(f"index search: {rescore} candidates per query from {index_obj.rows} sequences")
            warnings.append(f"candidates from the projected-gradient index {index} "
                            f"({rescore} per query); scores re-computed with full "
                            f"{curvature.kind}; the histogram shows projected index scores")
        else:
            from datasleuth.scale.batching import compress_queries, scan_low_rank

            low = compress_queries(model, CausalLMTask(), curvature, batches, rank)
            wide = replace(config, top_k=rescore, bottom_k=rescore if config.bottom_k else 0)
            scan = scan_corpus(
                model, None, corpus, wide, candidates=candidates, scores_dir=scores_dir,
                query_ids=[q.id for q in queries], progress=progress, checkpoint=checkpoint,
                run_key=key, shape=(len(queries), len(low.layer_names)),
                scanner=lambda m, t, loader, on_scores, p: scan_low_rank(
                    m, t, low, loader, on_scores, p))
            lists = [np.union1d(np.array([i for i, _, _ in scan.top.results(q)], np.int64),
                                np.array([i for i, _, _ in scan.bottom.results(q)], np.int64))
                     for q in range(len(queries))]
            samples, scanned = scan.samples, scan.scanned
            stage = {"kind": "low_rank", "rank": rank, "rescored_per_query": rescore}
            warnings.append(f"candidates from rank-{rank} query batching ({rescore} best and "
                            f"worst per query), re-scored at full rank; the histogram shows "
                            f"rank-{rank} scores")
        results = _rescore_by_chunks(model, curvature, corpus, batches, lists, rows, config,
                                     header, samples, scanned, progress)
    results["warnings"] = warnings
    results["config"].update(curvature=curvature.metadata.get("config"),
                             candidates_k=candidates_k, layers=curvature.layer_names,
                             first_stage=stage)
    if world()[0] == 0:
        write_json(results_path, results)
    barrier()
    return results


def run_self_influence(
    model: nn.Module,
    corpus: PackedCorpus,
    curvature: Curvature,
    out_dir: str | Path,
    top_k: int = 50,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Rank every packed sequence by self-influence ∇Lᵀ(G + λI)⁻¹∇L (METHOD.md §6).

    High self-influence marks sequences the model could not fit from the rest of the
    data: mislabeled, corrupt or unusual text (Koh & Liang 2017; Grosse et al. 2023).
    Writes ``OUT/self_influence.parquet`` (every sequence: score, per-layer scores and
    training loss, the simpler baseline) and ``OUT/self_influence.json`` (the top-k
    with their text and source documents); returns the latter. Under torch.distributed
    each process scores its block of the corpus and rank 0 writes the files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datasleuth.scoring import Scores, self_influence

    check_context(model, corpus.seq_len)
    task = CausalLMTask()
    block = list(shard(len(corpus)))  # this process's sequences (all of them alone)
    loader = DataLoader(block, batch_size=batch_size, collate_fn=corpus.collate)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    names: list[str] = list(curvature.layer_names)
    if block:
        scores = self_influence(model, task, curvature, loader, progress=progress)
        names = scores.layer_names
        parts.append((scores.total.double(), scores.per_layer.double(), scores.loss.double()))
    gathered = [p for ps in gather_objects(parts) for p in ps]  # blocks in rank order
    scores = Scores(torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]),
                    names)
    loss = torch.cat([g[2] for g in gathered])
    if world()[0] != 0:
        barrier()
        return {"top": [], "n_sequences": len(corpus)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = {"sequence": pa.array(np.arange(len(corpus), dtype=np.int64)),
            "self_influence": pa.array(scores.total.double().numpy()),
            "loss": pa.array(loss.numpy())}
    for j, name in enumerate(scores.layer_names):
        cols[f"layer:{name}"] = pa.array(scores.per_layer[:, j].double().numpy())
    with atomic_path(out / "self_influence.parquet") as tmp:
        pq.write_table(pa.table(cols), str(tmp))
    order = torch.argsort(-scores.total.double(), stable=True)[:top_k].tolist()
    rank_by_loss = torch.argsort(torch.argsort(-loss, stable=True), stable=True)
    rows = []
    for r, i in enumerate(order):
        docs = sorted({int(seg.doc_index) for seg in corpus.segments(i)})
        rows.append({"rank": r + 1, "index": int(i), "self_influence": float(scores.total[i]),
                     "layer_scores": [float(x) for x in scores.per_layer[i]],
                     "loss": float(loss[i]), "loss_rank": int(rank_by_loss[i]) + 1,
                     "documents": docs, "text": corpus.text(i)})
    doc = {"format_version": 1, "tool": "datasleuth", "kind": "self_influence",
           "curvature": curvature.metadata.get("config"), "layer_names": scores.layer_names,
           "n_sequences": len(corpus), "top": rows}
    write_json(out / "self_influence.json", doc)
    barrier()
    return doc
