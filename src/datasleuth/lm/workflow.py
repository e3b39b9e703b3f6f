"""The language-model workflow behind ``datasleuth fit | trace | index | self-influence``.

Each function loads what its options name (a local causal LM, the layers to track, the
packed corpus), reuses what a previous run left in the work directory, runs its step
and writes its files. The command line only turns options into these option types,
calls the function and prints; a Python program calls the same functions::

    from datasleuth.lm import LoadOptions, TraceOptions, trace_queries

    results = trace_queries(LoadOptions("model", "corpus.jsonl"), TraceOptions("q.jsonl"))

Option types check their values when they are made, so a bad combination is refused
before any model is loaded. For finer control, the steps themselves
(:func:`~datasleuth.lm.pipeline.prepare_corpus`, :func:`~datasleuth.lm.pipeline.fit_factors`,
:func:`~datasleuth.lm.pipeline.run_trace`, ...) take loaded objects instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from datasleuth.curvature import Curvature
from datasleuth.distributed import local_device, world
from datasleuth.errors import DatasleuthError
from datasleuth.fitting import FitConfig
from datasleuth.folders import locked_run
from datasleuth.fsdp import shard_model
from datasleuth.layers import TrackedLayer
from datasleuth.lm.corpus import PackedCorpus
from datasleuth.lm.methods import TraceMethod, run_baseline_trace, trace_method
from datasleuth.lm.model import (
    check_token_ids,
    context_length,
    default_layers,
    embedding_rows,
    load_model,
    separator_token,
)
from datasleuth.lm.pipeline import (
    DEFAULT_RESCORE,
    build_corpus_index,
    check_context,
    check_trace_options,
    fit_factors,
    open_corpus_index,
    prepare_corpus,
    run_trace,
)
from datasleuth.lm.queries import encode_queries, load_queries
from datasleuth.lm.refinement import refine_on_corpus
from datasleuth.lm.self_influence import run_self_influence
from datasleuth.lm.trace import TraceConfig
from datasleuth.memory import print_estimate
from datasleuth.refine import RefineConfig
from datasleuth.scale.index import GradientIndex, IndexConfig
from datasleuth.storage import check_writable

if TYPE_CHECKING:
    from datasleuth.evaluation.tail_patch import TailPatchConfig

__all__ = [
    "DEFAULT_SEQ_LEN",
    "LoadOptions",
    "FitOptions",
    "Candidates",
    "TraceOptions",
    "SelfInfluenceOptions",
    "IndexOptions",
    "Inputs",
    "TailPatchOptions",
    "load_inputs",
    "fit",
    "trace_queries",
    "rank_self_influence",
    "index_corpus",
    "tail_patch_results",
]

DEFAULT_SEQ_LEN = 512
DTYPES = ("auto", "float32", "bfloat16", "float16")
FISHERS = ("sampled", "empirical")


def _positive(value: int | None, what: str, least: int = 1) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < least):
        raise DatasleuthError(f"{what} must be an integer >= {least}, got {value!r}")


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass field


def _is_dataset(value: Any) -> bool:
    import datasets

    return isinstance(value, (datasets.Dataset, datasets.IterableDataset))


@dataclass(frozen=True)
class LoadOptions:
    """What to load: a causal LM, its tokenizer, the layers to track, the corpus to pack.

    ``model`` (and ``tokenizer``, default: the model's own) is a local folder or a Hub
    id found in the Hugging Face cache; ``download`` lets a missing Hub id or
    ``datasets`` name be fetched. ``corpus`` is one reference or several: files,
    folders, ``save_to_disk`` folders, ``datasets`` names (``split`` and
    ``dataset_config`` pick the split and configuration) or ``datasets.Dataset``
    objects; paths and names are kept as strings. ``layers`` are glob patterns over
    module names (empty: the MLP layers, plus attention projections with
    ``attention``). ``seq_len`` ``None`` packs 512 tokens, or the model's context if
    shorter. ``separator`` is the token put after every document (a token string or
    id; default EOS); ``pack=False`` keeps one document per sequence (padded, cut at
    ``seq_len`` with a warning). ``workdir`` keeps the packed corpus and fitted factors
    for reuse.
    """

    model: str | os.PathLike[str]
    corpus: Any
    workdir: str | os.PathLike[str] = "datasleuth-work"
    layers: Sequence[str] = ()
    attention: bool = False
    device: str = "cpu"
    dtype: str = "auto"
    trust_remote_code: bool = False
    seq_len: int | None = None
    text_field: str = "text"
    streaming: bool = False
    tokenizer: str | os.PathLike[str] | None = None
    download: bool = False
    separator: int | str | None = None
    pack: bool = True
    split: str | None = None
    dataset_config: str | None = None
    fsdp: bool = False  # shard the model over the torchrun processes (datasleuth.fsdp)

    def __post_init__(self) -> None:
        single = isinstance(self.corpus, (str, os.PathLike)) or _is_dataset(self.corpus)
        refs = (self.corpus,) if single else tuple(self.corpus)
        _set(self, "corpus", tuple(r if _is_dataset(r) else os.fspath(r) for r in refs))
        _set(self, "model", os.fspath(self.model))
        _set(self, "workdir", os.fspath(self.workdir))
        if self.tokenizer is not None:
            _set(self, "tokenizer", os.fspath(self.tokenizer))
        _set(self, "layers", (self.layers,) if isinstance(self.layers, str)
             else tuple(self.layers))
        if not self.corpus:
            raise DatasleuthError("no corpus given; pass at least one corpus file or folder")
        if self.dtype not in DTYPES:
            raise DatasleuthError(f"dtype must be one of {', '.join(DTYPES)}, got "
                                  f"{self.dtype!r}")
        _positive(self.seq_len, "seq_len", least=2)
        if isinstance(self.separator, str) and not self.separator:
            raise DatasleuthError("separator is empty; give a token (e.g. '<|endoftext|>') or "
                                  "its id")

    @property
    def corpus_name(self) -> str:
        """The corpus as the results name it."""
        return ", ".join(r if isinstance(r, str) else f"<{type(r).__name__} of "
                         f"{getattr(r, 'num_rows', '?')} rows>" for r in self.corpus)


@dataclass(frozen=True)
class FitOptions:
    """How curvature is fitted: the engine's :class:`FitConfig`, batch size, sample size."""

    config: FitConfig = field(default_factory=FitConfig)
    batch_size: int = 8
    max_sequences: int | None = None  # fit on at most this many sequences (None: all)
    factors: str | None = None  # a curvature file to use instead (lm.trainer.load_factors)

    def __post_init__(self) -> None:
        _positive(self.batch_size, "batch_size")
        _positive(self.max_sequences, "max_sequences")


@dataclass(frozen=True)
class Candidates:
    """How each query's candidate sequences are found before exact scoring.

    All stages end in exact (full-rank) scores. ``bm25``: only each query's BM25 top-k
    sequences are scanned (docs/method.md §5; biased towards word overlap, and the results
    say so). ``rank``: query batching, one pass with rank-k query gradients, then the
    ``rescore`` best and worst re-scored at full rank (docs/method.md §4). ``index``: search
    a projected-gradient index folder for ``rescore`` candidates (FAISS with
    ``approximate``), re-scored with the fitted curvature. ``index`` goes with neither
    ``bm25`` nor ``rank``.
    """

    bm25: int | None = None
    rank: int | None = None
    index: str | os.PathLike[str] | None = None
    approximate: bool = False
    rescore: int = DEFAULT_RESCORE

    def __post_init__(self) -> None:
        if self.index is not None:
            _set(self, "index", os.fspath(self.index))
        check_trace_options(self.rank, self.index, self.bm25, self.rescore, self.approximate)


@dataclass(frozen=True)
class TraceOptions:
    """What to trace and where: the queries, the output folder, how to scan.

    ``queries`` is a JSON Lines path, a list of dicts or :class:`~datasleuth.lm.Query`
    objects, or a ``datasets.Dataset`` (:func:`~datasleuth.lm.load_queries`). ``out``
    receives ``results.json``, the long table ``results.parquet`` and, with
    ``report``, ``report.html``; ``all_scores`` also streams every score to
    ``out/scores/`` (Parquet parts).
    ``method`` (:data:`~datasleuth.lm.methods.TRACE_METHODS`: ekfac, kfac, diagonal, dot,
    cosine, repsim, bm25) is one method per run; ``None`` follows the fitted curvature.
    To compare methods, trace each into its own ``out`` (the packed corpus and factors
    in the work directory are reused) and tail-patch the results together.
    """

    queries: Any
    out: str | os.PathLike[str] = "datasleuth-out"
    config: TraceConfig = field(default_factory=TraceConfig)
    candidates: Candidates = field(default_factory=Candidates)
    all_scores: bool = False
    report: bool = True
    method: str | None = None
    refine: RefineConfig | None = None  # docs/method.md §9: refine the fitted curvature

    def __post_init__(self) -> None:
        if self.refine is not None and self.method and not trace_method(self.method).influence:
            raise DatasleuthError(f"--refine refines influence; drop it for --method {self.method}")
        if isinstance(self.queries, (str, os.PathLike)):
            _set(self, "queries", os.fspath(self.queries))
        _set(self, "out", os.fspath(self.out))
        if self.all_scores and self.candidates.index is not None:
            raise DatasleuthError("--all-scores needs a scan of every sequence; drop --index")
        if self.method is not None and not trace_method(self.method).influence and (
                self.candidates.rank is not None or self.candidates.index is not None):
            raise DatasleuthError(f"--rank and --index find candidates for influence methods; "
                                  f"drop them for --method {self.method}")

    @property
    def results_path(self) -> Path:
        return Path(self.out) / "results.json"

    @property
    def table_path(self) -> Path:
        return Path(self.out) / "results.parquet"

    @property
    def report_path(self) -> Path:
        return Path(self.out) / "report.html"


@dataclass(frozen=True)
class SelfInfluenceOptions:
    """Where the self-influence ranking goes and how many sequences it lists in full."""

    out: str | os.PathLike[str] = "datasleuth-self"
    top_k: int = 20
    batch_size: int = 8

    def __post_init__(self) -> None:
        _set(self, "out", os.fspath(self.out))
        _positive(self.top_k, "top_k")
        _positive(self.batch_size, "batch_size")

    @property
    def paths(self) -> tuple[Path, Path]:
        """The ranking's files: top-k (JSON) and every sequence (Parquet)."""
        return Path(self.out) / "self_influence.json", Path(self.out) / "self_influence.parquet"


@dataclass(frozen=True)
class IndexOptions:
    """A projected-gradient index: its folder, projection (:class:`IndexConfig`), fit."""

    out: str | os.PathLike[str] = "datasleuth-index"
    config: IndexConfig = field(default_factory=lambda: IndexConfig(  # quantised rows of
        whitening="ekfac", projection="eigen", dtype="auto"))  # EK-FAC eigen-coordinates
    batch_size: int = 8
    fisher: str = "sampled"
    max_sequences: int | None = None  # fit the projected curvature on at most this many
    bytes_per_sequence: int | None = 16384  # sizes from effective dimensions (§11);
    # None: config.k_in, config.k_out as given

    def __post_init__(self) -> None:
        _set(self, "out", os.fspath(self.out))
        _positive(self.batch_size, "batch_size")
        _positive(self.max_sequences, "max_sequences")
        _positive(self.bytes_per_sequence, "bytes_per_sequence")
        if self.fisher not in FISHERS:
            raise DatasleuthError(f"fisher must be one of {', '.join(FISHERS)}, got "
                                  f"{self.fisher!r}")


@dataclass(frozen=True)
class TailPatchOptions:
    """Which traces to tail-patch and how (docs/method.md §10).

    ``results``: ``results.json`` of traces of the same queries (e.g. one per ``--method``);
    ``methods``: rankings computed beside them (``bm25``, ``repsim``); ``config``: a
    :class:`~datasleuth.evaluation.tail_patch.TailPatchConfig` (``None``: its defaults).
    ``out`` receives ``tail_patch.json``, ``results.json`` (the first trace's results with
    each query's tail-patch rows) and ``report.html``. ``queries``: the trace's queries
    (``None``: rebuilt from the results' texts; chat queries need them).
    """

    results: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
    out: str | os.PathLike[str] = "datasleuth-eval"
    config: TailPatchConfig | None = None
    methods: Sequence[str] = ("bm25", "repsim")
    batch_size: int = 8
    report: bool = True
    queries: Any = None

    def __post_init__(self) -> None:
        paths = ((self.results,) if isinstance(self.results, (str, os.PathLike))
                 else tuple(self.results))
        _set(self, "results", tuple(os.fspath(p) for p in paths))
        _set(self, "out", os.fspath(self.out))
        _set(self, "methods", tuple(self.methods))
        if not self.results:
            raise DatasleuthError("no results to tail-patch; pass a trace's results.json")
        bad = [m for m in self.methods if m not in ("bm25", "repsim")]
        if bad:
            raise DatasleuthError(f"tail-patch computes bm25 and repsim rankings itself, not "
                                  f"{bad[0]!r}; trace that method and pass its results.json")
        _positive(self.batch_size, "batch_size")


@dataclass
class Inputs:
    """What :func:`load_inputs` loaded: model, tokenizer, tracked layers, packed corpus."""

    model: nn.Module
    tokenizer: Any
    layers: list[TrackedLayer]
    corpus: PackedCorpus


def load_inputs(options: LoadOptions, *, progress: bool = True) -> Inputs:
    """Load and check the model and tokenizer, choose the layers, pack (or reuse) the corpus.

    A tokenizer that cannot be the model's, a separator outside its vocabulary and a
    packing with token ids outside it are refused here, before any fitting.
    """
    check_writable(options.workdir, "--workdir")  # before any work, not after an hour of it
    model, tokenizer = load_model(options.model, dtype=options.dtype,
                                  device=local_device(options.device),
                                  trust_remote_code=options.trust_remote_code,
                                  download=options.download, tokenizer=options.tokenizer)
    model = shard_model(model) if options.fsdp else model
    seq_len = options.seq_len
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, context_length(model) or DEFAULT_SEQ_LEN)
    check_context(model, seq_len)  # before packing
    layers = default_layers(model, include=options.layers or None, attention=options.attention)
    separator = separator_token(tokenizer, options.separator, embedding_rows(model))
    refs = [r if _is_dataset(r) else Path(r) for r in options.corpus]
    corpus = prepare_corpus(refs if len(refs) > 1 else refs[0], tokenizer, options.workdir,
                            seq_len, options.text_field, progress, options.streaming,
                            separator=separator, pack=options.pack, split=options.split,
                            dataset_config=options.dataset_config, download=options.download)
    check_token_ids(embedding_rows(model), [corpus.metadata.get("max_token_id", -1)],
                    "the packed corpus holds token id", "re-pack it with the model's own "
                    "tokenizer (--tokenizer FOLDER)")
    return Inputs(model, tokenizer, layers, corpus)


def _fit(inputs: Inputs, workdir: str | os.PathLike[str], options: FitOptions, progress: bool,
         queries: int = 0, rank: int | None = None) -> Curvature:
    if options.factors is not None:  # e.g. fitted during training (datasleuth.lm.trainer)
        from datasleuth.lm.trainer import load_factors

        return load_factors(options.factors, inputs.model)
    if progress and world()[0] == 0:  # state the memory before the run (datasleuth.memory)
        print_estimate(inputs.layers, options.config, options.batch_size, inputs.corpus,
                       queries, rank)
    return fit_factors(inputs.model, inputs.layers, inputs.corpus, workdir, options.config,
                       options.batch_size, options.max_sequences, progress)


@locked_run("load.workdir", "options.out")
def fit(load: LoadOptions, options: FitOptions | None = None, *, progress: bool = True
        ) -> Curvature:
    """Fit curvature factors (EK-FAC by default) on the corpus, or reuse a matching fit.

    The factors are kept as ``WORKDIR/factors-<kind>.safetensors``.
    """
    return _fit(load_inputs(load, progress=progress), load.workdir, options or FitOptions(),
                progress)


@locked_run("load.workdir", "options.out")
def trace_queries(load: LoadOptions, options: TraceOptions, fitting: FitOptions | None = None,
                  *, progress: bool = True) -> dict[str, Any]:
    """Find the training sequences that made each query's completion more (or less) likely.

    Bad queries, queries longer than the model's context and an index of another
    corpus are refused before any fitting. Fits (or reuses) the curvature, writes
    ``OUT/results.json`` (reused when every input matches) and, unless
    ``options.report`` is off, ``OUT/report.html``; returns the results document.
    """
    queries = load_queries(options.queries)  # fail fast on bad queries, before heavy work
    fitting = fitting or FitOptions()
    method = _trace_method(options, fitting)
    inputs = load_inputs(load, progress=progress)
    encode_queries(queries, inputs.tokenizer, max_length=context_length(inputs.model))
    stage = options.candidates
    if stage.index is not None:
        open_corpus_index(stage.index, inputs.model, inputs.corpus)  # a mismatch: refuse now
    if method.influence:
        fitting = replace(fitting, config=replace(fitting.config, curvature=method.curvature))
        curvature = _fit(inputs, load.workdir, fitting, progress, len(queries), stage.rank)
        if method.precondition is not None:  # e.g. a refined solver started from the fit
            curvature = method.precondition(inputs.model, inputs.corpus, curvature)
        if options.refine is not None:
            curvature = refine_on_corpus(inputs.model, inputs.corpus, curvature, options.refine,
                                         fitting.batch_size, fitting.max_sequences)
    else:
        curvature = None
    results = _trace(inputs, curvature, method, queries, load, options, progress)
    if options.report and world()[0] == 0 and curvature is None:  # else written with results
        from datasleuth.report import render_report

        render_report(results, options.report_path)
    return results


def _trace_method(options: TraceOptions, fitting: FitOptions) -> TraceMethod:
    """``options.method``, or the influence method of the curvature being fitted."""
    if options.method is not None:
        return trace_method(options.method)
    kind = fitting.config.curvature
    return trace_method("dot" if kind == "identity" else kind)


def _trace(inputs: Inputs, curvature: Any, method: TraceMethod, queries: Any,
           load: LoadOptions, options: TraceOptions, progress: bool) -> dict[str, Any]:
    """Run the trace of an influence method (``curvature`` given) or of a baseline."""
    stage = options.candidates
    if curvature is None:
        return run_baseline_trace(inputs.model, inputs.tokenizer, inputs.corpus, method,
                                  inputs.layers, queries, options.out, options.config,
                                  model_name=str(load.model), corpus_name=load.corpus_name,
                                  candidates_k=stage.bm25, workdir=load.workdir,
                                  all_scores=options.all_scores, progress=progress)
    return run_trace(inputs.model, inputs.tokenizer, inputs.corpus, curvature,
                     queries, options.out, options.config,
                     model_name=str(load.model), corpus_name=load.corpus_name,
                     candidates_k=stage.bm25, workdir=load.workdir,
                     all_scores=options.all_scores, rank=stage.rank, index=stage.index,
                     rescore=stage.rescore, approximate=stage.approximate, progress=progress,
                     report=options.report_path if options.report else None)


@locked_run("load.workdir", "options.out")
def rank_self_influence(load: LoadOptions, options: SelfInfluenceOptions | None = None,
                        fitting: FitOptions | None = None, *, progress: bool = True
                        ) -> dict[str, Any]:
    """Rank every packed sequence by self-influence: candidates for corrupt or odd data.

    Fits (or reuses) the curvature, writes ``OUT/self_influence.parquet`` (every
    sequence) and ``OUT/self_influence.json`` (the top-k); returns the latter (on
    processes other than rank 0 under torchrun: an empty ``top``).
    """
    options = options or SelfInfluenceOptions()
    inputs = load_inputs(load, progress=progress)
    curvature = _fit(inputs, load.workdir, fitting or FitOptions(), progress)
    return run_self_influence(inputs.model, inputs.corpus, curvature, options.out,
                              options.top_k, options.batch_size, progress)


@locked_run("load.workdir")  # the index folder is checked by the index itself
def index_corpus(load: LoadOptions, options: IndexOptions | None = None, *,
                 progress: bool = True) -> GradientIndex:
    """Build (or resume, or reuse) a projected-gradient index of the corpus.

    Candidates for ``trace_queries`` with ``Candidates(index=OUT)`` come from it; they
    are re-scored with the fitted curvature.
    """
    options = options or IndexOptions()
    check_writable(options.out)
    inputs = load_inputs(load, progress=progress)
    curvature = None  # EK-FAC (the trace's, reused from WORKDIR) whitens or sizes the index
    if options.config.whitened or options.bytes_per_sequence is not None:
        curvature = _fit(inputs, load.workdir, FitOptions(FitConfig(fisher=options.fisher),
                         options.batch_size, options.max_sequences), progress)
    return build_corpus_index(inputs.model, inputs.layers, inputs.corpus, options.out,
                              options.config, batch_size=options.batch_size,
                              fisher=options.fisher, max_sequences=options.max_sequences,
                              progress=progress, curvature=curvature,
                              bytes_per_sequence=options.bytes_per_sequence)


def tail_patch_results(load: LoadOptions, options: TailPatchOptions, *, progress: bool = True
                       ) -> dict[str, Any]:
    """Tail-patch each query's top sequences of the given traces, beside random, BM25 and
    representation-similarity sequences, on the model and corpus the traces used; write
    the files :class:`TailPatchOptions` names and return the tail-patch document."""
    from datasleuth.evaluation.tail_patch import TailPatchConfig
    from datasleuth.lm.tail_patch import tail_patch_traces, write_tail_patch
    from datasleuth.report import load_results

    docs = [dict(load_results(path)) for path in options.results]  # fail fast, before loading
    inputs = load_inputs(load, progress=progress)
    doc = tail_patch_traces(inputs.model, inputs.tokenizer, inputs.corpus, docs,
                            options.config or TailPatchConfig(), methods=options.methods,
                            workdir=load.workdir, batch_size=options.batch_size,
                            queries=options.queries, progress=progress)
    doc["results"] = list(options.results)
    write_tail_patch(doc, docs, options.out, options.report)
    return doc
