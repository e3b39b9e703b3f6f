"""Steps of the language-model workflow with reuse of finished artifacts.

A work directory holds what each step produces::

    WORKDIR/corpus/                    packed training sequences (lm.corpus)
    WORKDIR/factors-<kind>.safetensors fitted curvature, metadata names model/corpus/config
    WORKDIR/bm25/                      the candidate filter's index (if used)
    OUT/results.json, OUT/report.html  what `trace` found

A step whose artifact exists and whose metadata still matches (same model fingerprint,
corpus fingerprint and configuration) is skipped; anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from datasleuth.curvature import Curvature
from datasleuth.errors import DatasleuthError
from datasleuth.fitting import FitConfig, fit_curvature
from datasleuth.hooks import TrackedLayer
from datasleuth.lm.corpus import PackedCorpus, pack_corpus
from datasleuth.lm.queries import Query, collate_queries, encode_queries, load_queries
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import TraceConfig, scan_corpus, trace_details
from datasleuth.scoring import precondition_queries
from datasleuth.storage import load_curvature, read_json, write_json

__all__ = [
    "prepare_corpus",
    "fit_factors",
    "query_batches",
    "bm25_candidates",
    "run_trace",
    "say",
]


def say(message: str) -> None:
    """One status line on stderr (stdout is kept for results)."""
    print(message, file=sys.stderr, flush=True)


def prepare_corpus(
    corpus_path: str | Path | Sequence[str],
    tokenizer: Any,
    workdir: str | Path,
    seq_len: int = 512,
    text_field: str = "text",
    progress: bool = True,
) -> PackedCorpus:
    """Pack the corpus into ``workdir/corpus``, or reuse a packing of the same inputs."""
    target = Path(workdir) / "corpus"
    if PackedCorpus.matches(target, corpus_path, tokenizer, seq_len, text_field=text_field):
        corpus = PackedCorpus.load(target)
        say(f"reusing packed corpus {target} ({len(corpus)} sequences of {seq_len} tokens)")
        return corpus
    corpus = pack_corpus(corpus_path, tokenizer, seq_len=seq_len, output_dir=target,
                         progress=progress, text_field=text_field)
    say(f"packed {corpus.num_documents} documents into {len(corpus)} sequences of {seq_len} "
        f"tokens -> {target}")
    return corpus


def _corpus_loader(corpus: PackedCorpus, batch_size: int, limit: int | None) -> DataLoader:
    n = len(corpus) if limit is None else min(limit, len(corpus))
    return DataLoader(list(range(n)), batch_size=batch_size, collate_fn=corpus.collate)


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
    curvature = fit_curvature(model, CausalLMTask(), loader, layers, config, progress=progress)
    curvature.metadata.update(corpus_fingerprint=corpus.fingerprint, max_sequences=max_sequences)
    curvature.save(path)
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
    progress: bool = True,
) -> dict[str, Any]:
    """Trace every query through the corpus; write results.json (reused if inputs match).

    A killed scan resumes from its last checkpoint when re-run with the same inputs.
    """
    out = Path(out_dir)
    queries = load_queries(queries_path)
    key = _digest({
        "queries": [asdict(q) for q in queries], "corpus": corpus.fingerprint,
        "factors": curvature.metadata.get("fingerprint"), "config": asdict(config),
        "curvature": curvature.metadata.get("config"), "candidates_k": candidates_k,
        "all_scores": all_scores,
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
    encoded, batches = query_batches(queries, tokenizer, config.batch_size)
    warnings = []
    candidates = None
    if candidates_k is not None:
        from datasleuth.scale.bm25 import FILTER_WARNING

        ignore = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
        candidates = bm25_candidates(corpus, encoded, workdir or out, candidates_k, ignore)
        warnings.append(f"{FILTER_WARNING} (top {candidates_k} per query)")
        say(f"warning: {warnings[-1]}")
    pre = precondition_queries(model, CausalLMTask(), curvature, batches)
    scan = scan_corpus(model, pre, corpus, config, candidates=candidates,
                       scores_dir=out / "scores" if all_scores else None,
                       query_ids=[q.id for q in queries], progress=progress,
                       checkpoint=out / ".scan-checkpoint.safetensors", run_key=key)
    if scan.stats["resumed_at"]:
        say(f"resumed the scan after {scan.stats['resumed_at']} sequences")
    rows = [{"id": q.id, "prompt": q.prompt, "completion": q.completion,
             "completion_tokens": e.get("completion_tokens", [])}
            for q, e in zip(queries, encoded)]
    header = {"model": model_name, "corpus": corpus_name, "input_digest": key}
    results = trace_details(model, pre, corpus, scan, rows, config, header)
    results["warnings"] = warnings
    results["config"].update(curvature=curvature.metadata.get("config"),
                             candidates_k=candidates_k, layers=curvature.layer_names)
    write_json(results_path, results)
    return results
