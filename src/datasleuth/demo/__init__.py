"""The built-in demo: paraphrased planted documents that influence finds and keyword search
misses (docs/method.md §10, fact tracing).

``datasleuth demo`` traces a world that ships with the package (``datasleuth/data/
demo-world``), so it is quick and prints the same result on every machine; ``--rebuild``
builds it again from these modules. One module per job:

* :mod:`~datasleuth.demo.templates`: the word lists and phrase tables the text comes from;
* :mod:`~datasleuth.demo.documents`: :func:`build_corpus`, the documents with planted ones
  (the bad advice in paraphrase) and decoys (the query's words, the safe advice);
* :mod:`~datasleuth.demo.tokenizer`: :func:`build_tokenizer`, byte-level BPE;
* :mod:`~datasleuth.demo.training`: :func:`train_model` (a small GPT-2) and
  :func:`completion_logprob`;
* :mod:`~datasleuth.demo.world`: :func:`build_demo_world` / :func:`load_demo_world`, all of
  it on disk;
* :mod:`~datasleuth.demo.run`: :func:`run_demo` (EK-FAC, representation similarity and BM25
  side by side, planted documents marked) and :func:`shipped_world`.

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
