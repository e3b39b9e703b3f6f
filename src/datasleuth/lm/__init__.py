"""Language-model front end: load a causal LM, pack its corpus, fit, trace, rank, index.

The workflow functions run what the ``datasleuth`` commands run, from option types
that check their values (:mod:`datasleuth.lm.workflow`)::

    from datasleuth.lm import LoadOptions, TraceOptions, trace_queries

    load = LoadOptions(model="path/to/model", corpus="corpus.jsonl", workdir="work")
    results = trace_queries(load, TraceOptions(queries="queries.jsonl", out="out"))

The steps they are made of take loaded objects (:mod:`datasleuth.lm.pipeline`):
:func:`load_model`, :func:`default_layers`, :func:`prepare_corpus`,
:func:`fit_factors`, :func:`run_trace`, :func:`run_self_influence`,
:func:`build_corpus_index`. :class:`CausalLMTask` is the engine's task for causal LMs.
``trace`` methods (influence or a baseline) are in :data:`TRACE_METHODS`;
:func:`tail_patch_results` checks a trace on the model by tail-patching.
"""

from datasleuth.fitting import FitConfig
from datasleuth.lm.corpus import PackedCorpus, Segment, pack_corpus
from datasleuth.lm.methods import TRACE_METHODS, TraceMethod, register_method
from datasleuth.lm.model import context_length, default_layers, load_model
from datasleuth.lm.pipeline import (
    bm25_candidates,
    build_corpus_index,
    fit_factors,
    open_corpus_index,
    prepare_corpus,
    query_batches,
    run_trace,
)
from datasleuth.lm.queries import Query, encode_queries, load_queries, render_chat
from datasleuth.lm.self_influence import run_self_influence
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import TraceConfig
from datasleuth.lm.workflow import (
    DEFAULT_SEQ_LEN,
    Candidates,
    FitOptions,
    IndexOptions,
    Inputs,
    LoadOptions,
    SelfInfluenceOptions,
    TailPatchOptions,
    TraceOptions,
    fit,
    index_corpus,
    load_inputs,
    rank_self_influence,
    tail_patch_results,
    trace_queries,
)
from datasleuth.scale.index import GradientIndex, IndexConfig

__all__ = [
    "Candidates",
    "CausalLMTask",
    "DEFAULT_SEQ_LEN",
    "FitConfig",
    "FitOptions",
    "GradientIndex",
    "IndexConfig",
    "IndexOptions",
    "Inputs",
    "LoadOptions",
    "PackedCorpus",
    "Query",
    "Segment",
    "SelfInfluenceOptions",
    "TRACE_METHODS",
    "TailPatchOptions",
    "TraceConfig",
    "TraceMethod",
    "TraceOptions",
    "CurvatureCallback",
    "bm25_candidates",
    "build_corpus_index",
    "context_length",
    "default_layers",
    "encode_queries",
    "fit",
    "fit_factors",
    "index_corpus",
    "load_inputs",
    "load_model",
    "load_queries",
    "open_corpus_index",
    "pack_corpus",
    "prepare_corpus",
    "query_batches",
    "render_chat",
    "rank_self_influence",
    "register_method",
    "run_self_influence",
    "run_trace",
    "tail_patch_results",
    "trace_queries",
]


def __getattr__(name: str):
    """``CurvatureCallback`` imports transformers' Trainer machinery: only when asked."""
    if name == "CurvatureCallback":
        from datasleuth.lm.trainer import CurvatureCallback

        return CurvatureCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
