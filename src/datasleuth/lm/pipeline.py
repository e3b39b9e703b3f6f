"""Steps of the language-model workflow with reuse of finished artifacts.

A work directory holds what each step produces::

    WORKDIR/corpus/                    packed training sequences (lm.corpus)
    WORKDIR/factors-<kind>.safetensors fitted curvature, metadata names model/corpus/config
    WORKDIR/.fit-<kind>.checkpoint...  running sums of an unfinished fit (resumed, then removed)
    WORKDIR/bm25/                      the candidate filter's index (if used)
    INDEX/                             a projected-gradient index (`datasleuth index`)
    OUT/results.json, OUT/report.html  what `trace` found
    OUT/results.parquet                the same top-k as one long table

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
from torch import nn
from torch.utils.data import DataLoader

from datasleuth.curvature import Curvature
from datasleuth.distributed import barrier, rank_zero_first, shard, world
from datasleuth.errors import DatasleuthError
from datasleuth.fitting import FitConfig, fit_curvature
from datasleuth.folders import OutputSet
from datasleuth.layers import TrackedLayer
from datasleuth.lm.corpus import PackedCorpus, load_documents, pack_corpus
from datasleuth.lm.corpus.readers import has_names, is_paths
from datasleuth.lm.model import context_length
from datasleuth.lm.queries import (
    Query,
    collate_queries,
    encode_queries,
    load_queries,
    render_chat,
)
from datasleuth.lm.refinement import annotate_refinement
from datasleuth.lm.stages import (
    FirstStage,
    TraceJob,
    full_scan,
    index_stage,
    low_rank_stage,
    rescore_by_chunks,
)
from datasleuth.lm.tables import write_results_table
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import TraceConfig
from datasleuth.progress import snapshot_on_interrupt
from datasleuth.report import render_report
from datasleuth.storage import load_curvature, read_json, write_json

if TYPE_CHECKING:
    from datasleuth.scale.bm25 import CandidateFilter
    from datasleuth.scale.index import GradientIndex, IndexConfig

__all__ = [
    "prepare_corpus",
    "fit_factors",
    "query_batches",
    "bm25_candidates",
    "bm25_index",
    "build_corpus_index",
    "check_context",
    "check_trace_options",
    "open_corpus_index",
    "run_trace",
    "say",
]

DEFAULT_RESCORE = 100
_INDEX_CORPUS = "corpus.json"


def say(message: str) -> None:
    """One status line on stderr (stdout is kept for results); rank 0 only."""
    if world()[0] == 0:
        print(message, file=sys.stderr, flush=True)


def prepare_corpus(
    corpus_path: Any,
    tokenizer: Any,
    workdir: str | Path,
    seq_len: int = 512,
    text_field: str = "text",
    progress: bool = True,
    streaming: bool = False,
    *,
    separator: int | None = None,
    pack: bool = True,
    split: str | None = None,
    dataset_config: str | None = None,
    download: bool = False,
) -> PackedCorpus:
    """Pack the corpus into ``workdir/corpus``, or reuse a packing of the same inputs.

    ``corpus_path`` is what :func:`~datasleuth.lm.corpus.load_documents` reads (files,
    folders, ``datasets`` names or objects; ``split``, ``dataset_config`` and
    ``download`` apply to names and multi-split folders). ``streaming`` reads files as
    a stream instead of through the ``datasets`` Arrow cache (which copies the corpus to
    disk once); the packing is the same. ``separator`` is the token id put after every
    document (default EOS); ``pack=False`` keeps one document per sequence, cut at
    ``seq_len`` tokens with a warning.
    """
    target = Path(workdir) / "corpus"
    documents = corpus_path
    if has_names(corpus_path) or (is_paths(corpus_path) and (split or dataset_config)):
        documents = load_documents(corpus_path, text_field, streaming, split=split,
                                   dataset_config=dataset_config, download=download)
    with rank_zero_first():  # under torchrun, rank 0 packs and the others reuse it
        if PackedCorpus.matches(target, documents, tokenizer, seq_len, separator, text_field,
                                pack):
            try:
                corpus = PackedCorpus.load(target)
                if len(corpus):
                    corpus.input_ids(len(corpus) - 1)  # opens the token file: damaged?
                say(f"reusing packed corpus {target} ({len(corpus)} sequences of {seq_len} "
                    "tokens)")
                return corpus
            except DatasleuthError as e:
                say(f"packing again: {e}")
        corpus = pack_corpus(documents, tokenizer, seq_len=seq_len, output_dir=target,
                             progress=progress, text_field=text_field, streaming=streaming,
                             separator_token_id=separator, pack=pack)
        say(f"packed {corpus.num_documents} documents into {len(corpus)} sequences of "
            f"{seq_len} tokens" + ("" if pack else " (one document each)") + f" -> {target}")
        cut = corpus.metadata.get("truncated_documents", 0)
        if cut:
            say(f"warning: {cut} documents are longer than {seq_len} tokens and were cut there "
                f"({corpus.metadata['truncated_tokens']} tokens left out); raise --seq-len to "
                "keep them whole")
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
    with snapshot_on_interrupt():  # Ctrl-C: the next batch saves the fit, then stops
        curvature = fit_curvature(model, CausalLMTask(), loader, layers, config,
                                  progress=progress, checkpoint=snapshot, checkpoint_seconds=60.0,
                                  checkpoint_key=f"{corpus.fingerprint}:{max_sequences}:"
                                                 f"{batch_size}", keep_checkpoint=True)
    curvature.metadata.update(corpus_fingerprint=corpus.fingerprint, max_sequences=max_sequences)
    if world()[0] == 0:
        curvature.save(path)
    barrier()
    snapshot.unlink(missing_ok=True)  # only once the factors are safely on disk
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


def bm25_index(corpus: PackedCorpus, workdir: str | Path, ignore_ids: Sequence[int] = ()
               ) -> CandidateFilter:
    """The BM25 index of the corpus (docs/method.md §5), kept in ``workdir/bm25`` and reused."""
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
    return filt


def bm25_candidates(
    corpus: PackedCorpus,
    encoded: list[dict[str, Any]],
    workdir: str | Path,
    k: int,
    ignore_ids: Sequence[int] = (),
) -> list[np.ndarray]:
    """Per query, the top-k sequences by the BM25 variant of docs/method.md §5 (index reused)."""
    filt = bm25_index(corpus, workdir, ignore_ids)
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
    curvature: Curvature | None = None,
    bytes_per_sequence: int | None = None,
) -> GradientIndex:
    """Index every packed sequence's projected gradient and fit the projected curvature.

    docs/method.md §7 (Choe et al. 2024), §11: a whitened ``config`` uses the fitted
    ``curvature`` and needs no projected curvature; ``bytes_per_sequence`` picks the
    projection sizes from the curvature's effective dimensions. A killed build resumes
    at its first unfinished shard; a finished index of the same model, layers,
    projection and corpus is reused.
    """
    from datasleuth.scale.index import IndexConfig, build_index, fit_projected_curvature
    from datasleuth.scale.index.sizing import auto_config

    check_context(model, corpus.seq_len)
    directory = Path(directory)
    side = directory / _INDEX_CORPUS
    with rank_zero_first():  # under torchrun rank 0 writes the folder's marker
        if side.is_file():
            if read_json(side).get("corpus_fingerprint") != corpus.fingerprint:
                raise DatasleuthError(f"{directory} indexes a different corpus or packing; "
                                      f"pass a new --out folder or delete {directory}")
        elif directory.is_dir() and any(directory.iterdir()):
            raise DatasleuthError(f"{directory} is not empty and holds no datasleuth index; "
                                  "pass a new or empty --out folder")
        elif world()[0] == 0:
            directory.mkdir(parents=True, exist_ok=True)
            write_json(side, {"corpus_fingerprint": corpus.fingerprint,
                              "sequences": len(corpus)})
    task = CausalLMTask()
    config = config or IndexConfig()
    if bytes_per_sequence is not None and curvature is not None:
        config, _ = auto_config(config, layers, curvature, bytes_per_sequence)
    elif config.dtype == "auto":  # fixed sizes: every number at 16 bits, as before
        config = replace(config, dtype="float16")
    index = build_index(model, task, corpus.as_torch_dataset(), layers, directory,
                        config, batch_size=batch_size, collate_fn=corpus.collate,
                        progress=progress, curvature=curvature)
    n_fit = len(corpus) if max_sequences is None else min(max_sequences, len(corpus))
    meta = index.curvature.metadata if index.has_curvature else {}
    if config.whitened:
        pass  # rows carry the metric: queries need no projected curvature
    elif meta.get("fisher") == fisher and meta.get("sequences") == n_fit:
        say(f"reusing the projected curvature of {directory}")
    else:
        fit_projected_curvature(model, task, _corpus_loader(corpus, batch_size, max_sequences),
                                index, fisher=fisher, progress=progress)
    barrier()  # rank 0 has written the index
    say(f"index {directory}: {index.rows} sequences x {index.dim} numbers "
        f"({index.bytes_per_row} bytes per sequence as {config.dtype}, "
        f"{len(index.layer_names)} layers, whitening {config.whitening})")
    for name, r in (index.manifest.get("sizes") or {}).items():
        say(f"  {name}: effective dimension {r['effective_dimension']:.0f} of {r['size']}; "
            f"theory asks {r['theory_dim']} at distortion {r['distortion']}; "
            f"kept {r['k_out']}x{r['k_in']}")
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
    if not index.has_curvature:
        raise DatasleuthError(f"{directory} has no projected curvature (its build was "
                              "interrupted); re-run `datasleuth index` to finish it")
    return index


def check_trace_options(rank: int | None, index: str | Path | None,
                        candidates_k: int | None, rescore: int, approximate: bool) -> None:
    """Refuse combinations of the candidate stages that do not go together."""
    if index is not None and (rank is not None or candidates_k is not None):
        raise DatasleuthError("--index finds candidates by itself; drop --rank and --filter")
    if approximate and index is None:
        raise DatasleuthError("--approximate only applies to --index DIR; add --index")
    if rank is not None and rank < 1:
        raise DatasleuthError(f"rank must be >= 1, got {rank}")
    if candidates_k is not None and candidates_k < 1:
        raise DatasleuthError(f"candidates must be >= 1, got {candidates_k}")
    if rescore < 1:
        raise DatasleuthError(f"rescore must be >= 1, got {rescore}")


def _trace_key(
    queries: list[Query], corpus: PackedCorpus, curvature: Curvature, config: TraceConfig, *,
    candidates_k: int | None, all_scores: bool, rank: int | None, rescore: int,
    index: GradientIndex | None, approximate: bool,
) -> str:
    """Digest of everything a trace's results depend on (its reuse key)."""
    staged = rank is not None or index is not None
    return _digest({
        "queries": [asdict(q) for q in queries], "corpus": corpus.fingerprint,
        "factors": curvature.metadata.get("fingerprint"), "config": asdict(config),
        "curvature": curvature.metadata.get("config"), "candidates_k": candidates_k,
        "all_scores": all_scores, "rank": rank, "rescore": rescore if staged else None,
        "index": index.manifest if index is not None else None,
        "approximate": approximate,
    })


def _reusable(results_path: Path, key: str) -> dict[str, Any] | None:
    """The results document at ``results_path`` if it was made from the same inputs."""
    if not results_path.is_file():
        return None
    try:
        previous = read_json(results_path)
    except DatasleuthError:
        return None
    if previous.get("input_digest") != key:
        return None
    say(f"reusing {results_path} (same model, corpus, factors, queries and settings)")
    return previous


def _bm25_stage(tokenizer: Any, corpus: PackedCorpus, encoded: list[dict[str, Any]],
                workdir: str | Path, k: int) -> tuple[list[np.ndarray], str]:
    """Each query's BM25 top-k sequences (docs/method.md §5) and the warning the results carry."""
    from datasleuth.scale.bm25 import FILTER_WARNING

    ignore = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
    with rank_zero_first():
        candidates = bm25_candidates(corpus, encoded, workdir, k, ignore)
    warning = f"{FILTER_WARNING} (top {k} per query)"
    say(f"warning: {warning}")
    return candidates, warning


def _trace_job(
    model: nn.Module, tokenizer: Any, corpus: PackedCorpus, curvature: Curvature,
    queries: list[Query], config: TraceConfig, out: Path, header: dict[str, Any], *,
    candidates_k: int | None, workdir: str | Path, all_scores: bool, progress: bool,
) -> tuple[TraceJob, list[str]]:
    """Encode the queries, pre-select BM25 candidates if asked; the job and its warnings."""
    check_context(model, corpus.seq_len)
    encoded, batches = query_batches(queries, tokenizer, config.batch_size,
                                     max_length=context_length(model))
    warnings, candidates = [], None
    if candidates_k is not None:
        candidates, warning = _bm25_stage(tokenizer, corpus, encoded, workdir, candidates_k)
        warnings.append(warning)
    rows = [{"id": q.id, "prompt": q.prompt, "completion": q.completion,
             "completion_tokens": e.get("completion_tokens", [])}
            for q, e in zip(queries, encoded)]
    job = TraceJob(model, corpus, curvature, config, batches, rows, header, candidates,
                    out / "scores" if all_scores else None,
                    out / ".scan-checkpoint.safetensors", header["input_digest"], progress)
    return job, warnings


def run_trace(
    model: nn.Module,
    tokenizer: Any,
    corpus: PackedCorpus,
    curvature: Curvature,
    queries: Any,
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
    report: str | Path | None = None,
) -> dict[str, Any]:
    """Trace every query through the corpus; write results.json (reused if inputs match),
    its long table results.parquet (:mod:`datasleuth.lm.tables`) and, given ``report``, the
    HTML report there, all committed together.

    ``queries`` is what :func:`~datasleuth.lm.load_queries` reads: a JSON Lines path, a
    list of dicts or Query objects (chat transcripts included), a ``datasets.Dataset``.

    Three ways to find each query's candidates, all ending in exact scores:

    * default: every sequence scored with full-rank preconditioned query gradients;
    * ``rank=k``: query batching (docs/method.md §4) -- one pass with rank-k query gradients,
      then each query's ``rescore`` best and worst sequences scored again at full rank;
    * ``index=DIR``: search a projected-gradient index (docs/method.md §7) for ``rescore``
      candidates per query (exact, or FAISS with ``approximate``), then score those
      with full EK-FAC.

    ``candidates_k`` restricts the scan (or the low-rank pass) to the BM25 top-k per
    query (docs/method.md §5). A killed full or low-rank scan resumes from its checkpoint
    when re-run with the same inputs.
    """
    check_trace_options(rank, index, candidates_k, rescore, approximate)
    if index is not None and all_scores:
        raise DatasleuthError("--all-scores needs a scan of every sequence; drop --index")
    rescore = max(rescore, config.top_k, config.bottom_k)
    out = Path(out_dir)
    queries = render_chat(load_queries(queries), tokenizer)
    index_obj = open_corpus_index(index, model, corpus) if index is not None else None
    key = _trace_key(queries, corpus, curvature, config, candidates_k=candidates_k,
                     all_scores=all_scores, rank=rank, rescore=rescore, index=index_obj,
                     approximate=approximate)
    previous = _reusable(out / "results.json", key)
    if previous is not None:
        return _written(previous, corpus, out, table_only=True, report=report)
    job, warnings = _trace_job(model, tokenizer, corpus, curvature, queries, config, out,
                               {"model": model_name, "corpus": corpus_name, "input_digest": key},
                               candidates_k=candidates_k, workdir=workdir or out,
                               all_scores=all_scores, progress=progress)
    results, first = _find_and_score(job, index_obj, index, rank, rescore, approximate)
    results["warnings"] = warnings + ([first.warning] if first else [])
    results["config"].update(curvature=curvature.metadata.get("config"),
                             candidates_k=candidates_k, layers=curvature.layer_names,
                             first_stage=first.stage if first else {"kind": "full"},
                             corpus_fingerprint=corpus.fingerprint, seq_len=corpus.seq_len)
    annotate_refinement(results, curvature)  # trace --refine: residuals per query
    return _written(results, corpus, out, report=report)


def _written(results: dict[str, Any], corpus: PackedCorpus, out: Path, table_only: bool = False,
             report: str | Path | None = None) -> dict[str, Any]:
    """``results`` after rank 0 wrote OUT/results.parquet, OUT/results.json (the marker a
    re-run reuses) and the HTML ``report``, committed together (:class:`OutputSet`); with
    ``table_only``, the table alone if it is missing (and the report)."""
    if world()[0] == 0:
        with OutputSet(out) as files:
            if not table_only or not (out / "results.parquet").is_file():
                write_results_table(results, corpus, files.path("results.parquet"))
            if not table_only:
                write_json(files.path("results.json"), results)
            if report is not None:
                inside = Path(report).resolve().parent == out.resolve()
                render_report(results, files.path(Path(report).name) if inside else report)
    barrier()
    return results


def _find_and_score(job: TraceJob, index: GradientIndex | None, directory: str | Path | None,
                    rank: int | None, rescore: int, approximate: bool
                    ) -> tuple[dict[str, Any], FirstStage | None]:
    """The results document of the chosen candidate stage, and that stage (None: full scan)."""
    if index is not None and directory is not None:
        first: FirstStage | None = index_stage(job, index, directory, rescore, approximate)
        say(f"index search: {rescore} candidates per query from {index.rows} sequences")
    else:
        first = low_rank_stage(job, rank, rescore) if rank is not None else None
    if first is not None:
        return rescore_by_chunks(job, first), first
    results, resumed_at = full_scan(job)
    if resumed_at:
        say(f"resumed the scan after {resumed_at} sequences")
    return results, None
