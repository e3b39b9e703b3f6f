"""Tail-patch a trace's results on the user's own model (docs/method.md §10).

For each query of one or more ``results.json`` documents (traces of the same queries,
e.g. with different ``--method``), the top-k sequences each trace returned are
tail-patched (:func:`datasleuth.evaluation.tail_patch.tail_patch`) beside k random
sequences and the top-k of BM25 and of representation similarity over the whole packed
corpus (:mod:`datasleuth.lm.methods`). The measurement is log p(completion | prompt).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from datasleuth.baselines import (
    collect_representations,
    module_input_representation,
    representation_scan,
)
from datasleuth.errors import DatasleuthError
from datasleuth.evaluation.tail_patch import TailPatchConfig, tail_patch
from datasleuth.lm.corpus import PackedCorpus
from datasleuth.lm.methods import output_representation
from datasleuth.lm.pipeline import bm25_index, say
from datasleuth.lm.queries import (
    Query,
    collate_queries,
    encode_queries,
    load_queries,
    render_chat,
)
from datasleuth.lm.task import CausalLMTask
from datasleuth.storage import write_json

__all__ = ["EXTRA_METHODS", "trace_method_name", "tail_patch_traces", "attach_tail_patch",
           "write_tail_patch"]

EXTRA_METHODS = ("bm25", "repsim")
"""Rankings tail-patch computes itself over the whole corpus, beside the traces'."""


def trace_method_name(results: dict[str, Any]) -> str:
    """The method a results document was traced with (``dot`` for identity curvature)."""
    config = results.get("config") or {}
    if config.get("method"):
        return str(config["method"])
    kind = (config.get("curvature") or {}).get("curvature", "trace")
    return "dot" if kind == "identity" else str(kind)


def _queries(docs: Sequence[dict[str, Any]], source: Any, tokenizer: Any) -> list[Query]:
    """The queries the documents share (refusing documents of different queries): read
    from the trace's own ``source`` when it still holds them (chat transcripts are then
    encoded as the trace encoded them), else rebuilt from the prompt and completion texts."""
    first = [(q["id"], q["prompt"], q["completion"]) for q in docs[0]["queries"]]
    for doc in docs[1:]:
        if [(q["id"], q["prompt"], q["completion"]) for q in doc["queries"]] != first:
            raise DatasleuthError("the results documents trace different queries; tail-patch "
                                  "results of the same queries file")
    if not first:
        raise DatasleuthError("the results document holds no queries to tail-patch")
    if source is not None:
        loaded = render_chat(load_queries(source), tokenizer)
        if [(q.id, q.prompt, q.completion) for q in loaded] == first:
            return loaded
        say("note: the queries differ from the ones the results hold; patching with the "
            "results' prompt and completion texts")
    return [Query(prompt, completion, qid) for qid, prompt, completion in first]


def _check_corpus(docs: Sequence[dict[str, Any]], corpus: PackedCorpus) -> None:
    for doc in docs:
        stored = (doc.get("config") or {}).get("corpus_fingerprint")
        if stored is not None and stored != corpus.fingerprint:
            raise DatasleuthError("the results were traced on another corpus or packing than "
                                  "--corpus/--seq-len; pass the ones the trace used")
        bad = [r["index"] for q in doc["queries"] for r in q["top"] if r["index"] >= len(corpus)]
        if bad:
            raise DatasleuthError(f"the results name sequence {bad[0]} but the packed corpus has "
                                  f"{len(corpus)}; pass the --corpus/--seq-len the trace used")


def _repsim_top(model: nn.Module, corpus: PackedCorpus, batches: list[dict[str, Any]], k: int,
                batch_size: int, progress: bool) -> list[list[int]]:
    """Each query's top-k sequences by representation similarity, over the whole corpus."""
    represent = module_input_representation(CausalLMTask(), output_representation(model))
    queries = collect_representations(model, batches, represent)  # (Q, D)
    parts: list[torch.Tensor] = []
    loader = DataLoader(range(len(corpus)), batch_size=batch_size, collate_fn=corpus.collate)
    representation_scan(model, loader, represent, queries, lambda _, s: parts.append(s[..., 0]),
                        progress)
    scores = torch.cat(parts).t()  # (Q, C)
    return torch.argsort(-scores, dim=1, stable=True)[:, :k].tolist()


def tail_patch_traces(
    model: nn.Module, tokenizer: Any, corpus: PackedCorpus, docs: Sequence[dict[str, Any]],
    config: TailPatchConfig, *, methods: Sequence[str] = EXTRA_METHODS,
    workdir: str | Path = "datasleuth-work", batch_size: int = 8, queries: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tail-patch the top-k of every results document and of ``methods`` (bm25, repsim).

    ``queries``: the trace's queries (anything :func:`~datasleuth.lm.load_queries` reads),
    or ``None`` to rebuild them from the results' prompt and completion texts (chat
    queries then lose their own encoding). Returns the tail-patch document with
    ``query_ids`` and ``methods`` (the ranking names, each trace's under its method).
    """
    unknown = [m for m in methods if m not in EXTRA_METHODS]
    if unknown:
        raise DatasleuthError(f"tail-patch computes rankings of {', '.join(EXTRA_METHODS)}, not "
                              f"{unknown[0]!r}; trace other methods and pass their results")
    asked = _queries(docs, queries, tokenizer)
    _check_corpus(docs, corpus)
    encoded = encode_queries(asked, tokenizer)
    batches = [collate_queries([e]) for e in encoded]
    rankings: dict[str, list[list[int]]] = {}
    for doc in docs:
        name = trace_method_name(doc)
        name = name if name not in rankings else f"{name} ({len(rankings) + 1})"
        rankings[name] = [[int(r["index"]) for r in q["top"]] for q in doc["queries"]]
    if "bm25" in methods:
        ignore = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
        index = bm25_index(corpus, workdir, ignore)
        rankings["bm25"] = [index.top_k(e["input_ids"].tolist(), config.k)[0].tolist()
                            for e in encoded]
    if "repsim" in methods:
        rankings["repsim"] = _repsim_top(model, corpus, batches, config.k, batch_size, progress)
    doc = tail_patch(model, CausalLMTask(), batches, rankings,
                     lambda idx: corpus.collate([int(i) for i in idx]), len(corpus), config)
    doc.update(query_ids=[q.id for q in asked], methods=list(rankings),
               measurement="log p(completion | prompt)")
    return doc


def attach_tail_patch(results: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``results`` whose queries carry their rows of the tail-patch ``doc``
    (the report's optional ``tail_patch`` field)."""
    out = copy.deepcopy(results)
    c = doc["config"]
    for query, row in zip(out["queries"], doc["queries"]):
        rows = [{"method": name, "gain": gain, "std": None, "draws": None}
                for name, gain in row["gains"].items()]
        rows.append({"method": "random", "gain": row["random"]["mean"],
                     "std": row["random"]["std"], "draws": row["random"]["n"]})
        query["tail_patch"] = {"k": c["k"], "steps": c["steps"], "optimizer": c["optimizer"],
                               "lr": c["lr"], "before": row["before"], "rows": rows}
    return out


def write_tail_patch(doc: dict[str, Any], docs: Sequence[dict[str, Any]], out: str | Path,
                     report: bool = True) -> None:
    """Write ``OUT/tail_patch.json``, ``OUT/results.json`` (the first trace's results with
    each query's tail-patch rows) and, with ``report``, ``OUT/report.html``."""
    from datasleuth.report import render_report

    merged = attach_tail_patch(docs[0], doc)
    write_json(Path(out) / "tail_patch.json", doc)
    write_json(Path(out) / "results.json", merged)
    if report:
        render_report(merged, Path(out) / "report.html")
