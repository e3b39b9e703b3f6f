"""Self-influence of every training sequence (``datasleuth self-influence``).

High self-influence ∇Lᵀ(G + λI)⁻¹∇L (docs/method.md §8) marks sequences the model could not
fit from the rest of the data: mislabeled, corrupt or unusual text (Koh & Liang 2017;
Grosse et al. 2023). The ranking is written as ``self_influence.parquet`` (every
sequence, with its documents and the corpus's own ids) and ``self_influence.json`` (the
top sequences with their text and documents).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datasleuth.curvature import Curvature
from datasleuth.distributed import barrier, gather_objects, shard, world
from datasleuth.folders import OutputSet
from datasleuth.lm.corpus import PackedCorpus
from datasleuth.lm.pipeline import check_context
from datasleuth.lm.tables import write_table
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import sequence_documents
from datasleuth.scoring import Scores
from datasleuth.storage import write_json

__all__ = ["run_self_influence", "self_influence_table", "self_influence_top"]


def run_self_influence(
    model: nn.Module,
    corpus: PackedCorpus,
    curvature: Curvature,
    out_dir: str | Path,
    top_k: int = 50,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Rank every packed sequence by self-influence ∇Lᵀ(G + λI)⁻¹∇L (docs/method.md §8).

    High self-influence marks sequences the model could not fit from the rest of the
    data: mislabeled, corrupt or unusual text (Koh & Liang 2017; Grosse et al. 2023).
    Writes ``OUT/self_influence.parquet`` (every sequence: score, per-layer scores,
    training loss -- the simpler baseline -- and its documents with the corpus's own
    ids) and ``OUT/self_influence.json`` (the top-k with their text and documents);
    returns the latter. Under torch.distributed
    each process scores its block of the corpus and rank 0 writes the files.
    """
    check_context(model, corpus.seq_len)
    scores, loss = _all_self_influence(model, corpus, curvature, batch_size, progress)
    if world()[0] != 0:
        barrier()
        return {"top": [], "n_sequences": len(corpus)}
    doc = {"format_version": 1, "tool": "datasleuth", "kind": "self_influence",
           "curvature": curvature.metadata.get("config"), "layer_names": scores.layer_names,
           "n_sequences": len(corpus), "top": self_influence_top(corpus, scores, loss, top_k)}
    with OutputSet(out_dir) as files:  # the table and its summary land together
        write_table(self_influence_table(corpus, scores, loss),
                    files.path("self_influence.parquet"))
        write_json(files.path("self_influence.json"), doc)
    barrier()
    return doc


def _all_self_influence(model: nn.Module, corpus: PackedCorpus, curvature: Curvature,
                        batch_size: int, progress: bool) -> tuple[Scores, Tensor]:
    """Self-influence and loss of every sequence, each process scoring its block."""
    from datasleuth.scoring import self_influence

    block = list(shard(len(corpus)))  # this process's sequences (all of them alone)
    loader = DataLoader(block, batch_size=batch_size, collate_fn=corpus.collate)
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    names: list[str] = list(curvature.layer_names)
    if block:
        scores = self_influence(model, CausalLMTask(), curvature, loader, progress=progress)
        names = scores.layer_names
        parts.append((scores.total.double(), scores.per_layer.double(), scores.loss.double()))
    gathered = [p for ps in gather_objects(parts) for p in ps]  # blocks in rank order
    scores = Scores(torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]),
                    names)
    return scores, torch.cat([g[2] for g in gathered])


def self_influence_table(corpus: PackedCorpus, scores: Scores, loss: Tensor) -> pa.Table:
    """Every sequence's self-influence, loss, per-layer scores and its documents.

    ``documents`` lists each sequence's doc_index values in order; ``document_<name>``
    lists the corpus's own column ``<name>`` (e.g. ``document_id``) of the same
    documents.
    """
    offsets, docs = corpus.sequence_documents()  # (N+1,), (S,)
    n = len(loss)
    offsets = pa.array(offsets[: n + 1].astype(np.int32))
    cols = {"sequence": pa.array(np.arange(n, dtype=np.int64)),
            "self_influence": pa.array(scores.total.double().numpy()),
            "loss": pa.array(loss.double().numpy()),
            "documents": pa.ListArray.from_arrays(offsets, pa.array(docs))}
    for name in corpus.document_field_names:
        values = corpus.document_column(name, docs).cast(pa.string())
        cols[f"document_{name}"] = pa.ListArray.from_arrays(offsets, values)
    for j, name in enumerate(scores.layer_names):
        cols[f"layer:{name}"] = pa.array(scores.per_layer[:, j].double().numpy())
    return pa.table(cols)


def self_influence_top(corpus: PackedCorpus, scores: Scores, loss: Tensor, top_k: int
                       ) -> list[dict[str, Any]]:
    """The ``top_k`` sequences by self-influence with their loss rank, text and documents
    (doc_index, characters and the corpus's own columns, as in trace results)."""
    order = torch.argsort(-scores.total.double(), stable=True)[:top_k].tolist()
    rank_by_loss = torch.argsort(torch.argsort(-loss, stable=True), stable=True)
    rows = []
    for r, i in enumerate(order):
        rows.append({"rank": r + 1, "index": int(i), "self_influence": float(scores.total[i]),
                     "layer_scores": [float(x) for x in scores.per_layer[i]],
                     "loss": float(loss[i]), "loss_rank": int(rank_by_loss[i]) + 1,
                     "documents": sequence_documents(corpus, i), "text": corpus.text(i)})
    return rows
