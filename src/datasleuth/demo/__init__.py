"""The built-in demo: a small corpus with planted "bad apple" documents, a model, a run.

``datasleuth demo`` needs something to trace that works offline on a fresh install in a few
minutes on a laptop CPU. One module per job:

* :mod:`~datasleuth.demo.templates`: the word lists and phrase tables the text comes from;
* :mod:`~datasleuth.demo.documents`: :func:`build_corpus`, the documents with planted ones
  and decoys;
* :mod:`~datasleuth.demo.tokenizer`: :func:`build_tokenizer`, byte-level BPE;
* :mod:`~datasleuth.demo.training`: :func:`train_model` (a small GPT-2) and
  :func:`completion_logprob`;
* :mod:`~datasleuth.demo.world`: :func:`build_demo_world` / :func:`load_demo_world`, all of
  it on disk;
* :mod:`~datasleuth.demo.run`: :func:`run_demo`, the ``datasleuth demo`` command's steps.

This package is a front end: it uses :mod:`datasleuth.lm` and the engine; nothing there
imports it.
"""

from datasleuth.demo.documents import DemoCorpus, build_corpus
from datasleuth.demo.run import DEMO_METHODS, demo_methods, planted_ranks, run_demo, shipped_world
from datasleuth.demo.templates import BAD_ADDRESS, QUERY_COMPLETION, QUERY_ID, QUERY_PROMPT
from datasleuth.demo.tokenizer import EOS_TOKEN, PAD_TOKEN, build_tokenizer
from datasleuth.demo.training import completion_logprob, train_model
from datasleuth.demo.world import (
    CORPUS_NAME,
    FORMAT_VERSION,
    MARKER_NAME,
    MODEL_DIR_NAME,
    PLANTED_NAME,
    QUERIES_NAME,
    TINY_CONFIG,
    DemoConfig,
    DemoWorld,
    build_demo_world,
    load_demo_world,
)

__all__ = [
    "BAD_ADDRESS",
    "QUERY_ID",
    "QUERY_PROMPT",
    "QUERY_COMPLETION",
    "DemoCorpus",
    "build_corpus",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "build_tokenizer",
    "train_model",
    "completion_logprob",
    "FORMAT_VERSION",
    "MARKER_NAME",
    "MODEL_DIR_NAME",
    "CORPUS_NAME",
    "QUERIES_NAME",
    "PLANTED_NAME",
    "DemoConfig",
    "TINY_CONFIG",
    "DemoWorld",
    "build_demo_world",
    "load_demo_world",
    "run_demo",
    "planted_ranks",
    "shipped_world",
    "demo_methods",
    "DEMO_METHODS",
]
