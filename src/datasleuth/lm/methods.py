"""The methods of ``datasleuth trace --method``: influence, or a baseline without curvature.

A :class:`TraceMethod` is either

* **influence**: a curvature kind fitted on the corpus (factors kept in the work
  directory and reused), scored by the ordinary trace (full scan, ``--rank``, ``--index``,
  ``--filter bm25``). ``ekfac`` (default), ``kfac``, ``diagonal`` and ``dot`` (the
  identity curvature: the gradient dot product). ``precondition`` turns the fitted
  curvature into the preconditioner that scores — the place where a refined EK-FAC
  solver plugs in (:func:`register_method`);
* a **baseline** (:func:`run_baseline_trace`): its own scan of the corpus through
  :func:`~datasleuth.lm.trace.scan_corpus` (top and bottom sequences, histogram,
  sparsity, ``--all-scores``, ``--filter bm25``, resuming, torchrun), with token scores
  that sum to each sequence's score:

  - ``cosine``: unit-normalised gradients over the tracked layers (TrackStar; global
    norm, :mod:`datasleuth.baselines`); token t's score is its token-wise dot with the
    unit query gradient (docs/method.md §6) divided by ‖∇log p(z_m)‖;
  - ``repsim``: cosine of mean last hidden states — the input of the output embedding
    (``lm_head``; after the final layer norm in GPT-2 and Llama), averaged over the
    query's prompt and completion tokens and over a training sequence's real tokens;
    token t's score is ⟨q̂, h_t⟩ / (n ‖h̄‖);
  - ``bm25``: BM25 of the query's prompt + completion tokens (docs/method.md §5, the
    filter's index in the work directory); each distinct query token's term is put on
    its first occurrence in the sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from datasleuth.baselines import (
    CosineScorers,
    collect_representations,
    gradient_norms,
    module_input_representation,
    module_inputs,
    representation_scan,
    unit_rows,
)
from datasleuth.curvature import Curvature
from datasleuth.distributed import rank_zero_first
from datasleuth.errors import DatasleuthError
from datasleuth.layers import TrackedLayer
from datasleuth.lm.corpus import PackedCorpus
from datasleuth.lm.pipeline import (
    _digest,
    _reusable,
    _trace_job,
    _written,
    bm25_index,
    check_context,
)
from datasleuth.lm.queries import load_queries, render_chat
from datasleuth.lm.stages import TraceJob
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import TraceConfig, _token_heat, scan_corpus, trace_details
from datasleuth.preconditioner import Preconditioner
from datasleuth.progress import progress_bar
from datasleuth.scoring import collect_gradients
from datasleuth.storage import model_fingerprint
from datasleuth.streaming import evaluation

__all__ = ["TRACE_METHODS", "TraceMethod", "register_method", "run_baseline_trace",
           "trace_method", "output_representation"]

Scanner = Callable[[nn.Module, CausalLMTask, Any, Callable[[int, Tensor], None], bool], None]
Heat = Callable[[list[int]], dict[int, Tensor]]


class BaselineInputs(NamedTuple):
    """What a baseline's scan is made from."""

    job: TraceJob  # the model, corpus, query batches and trace settings
    layers: list[TrackedLayer]
    workdir: Path  # where the BM25 index is kept
    ignore_ids: list[int]  # the tokenizer's pad/eos ids, left out of BM25


class Parts(NamedTuple):
    """What a baseline contributes to a trace: its scan, token scores and layers."""

    scanner: Scanner
    heat: Heat
    note: str
    layers: list[str]  # names of the per-layer shares of the score (none: no breakdown)


@dataclass(frozen=True)
class TraceMethod:
    """One method of ``trace --method`` (module docstring)."""

    name: str
    description: str
    curvature: str | None = None  # influence: the curvature kind fitted on the corpus
    precondition: Callable[[nn.Module, PackedCorpus, Curvature], Preconditioner] | None = None
    baseline: Callable[[BaselineInputs], Parts] | None = None

    @property
    def influence(self) -> bool:
        return self.curvature is not None


TRACE_METHODS: dict[str, TraceMethod] = {}


def register_method(method: TraceMethod) -> None:
    """Make ``method`` selectable by name (``trace --method NAME``)."""
    if (method.curvature is None) == (method.baseline is None):
        raise DatasleuthError(f"method {method.name!r} must be either influence (a curvature "
                              "kind) or a baseline (a scan), not both or neither")
    TRACE_METHODS[method.name] = method


def trace_method(name: str) -> TraceMethod:
    """The registered method ``name``, or a one-line error listing them."""
    if name not in TRACE_METHODS:
        raise DatasleuthError(f"unknown method {name!r}; choose one of "
                              f"{', '.join(TRACE_METHODS)}")
    return TRACE_METHODS[name]


def output_representation(model: nn.Module):
    """A language model's mean last hidden state (the input of its output embedding)."""
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if not isinstance(module, nn.Module):
        raise DatasleuthError("repsim needs the model's output embedding "
                              "(get_output_embeddings()); this model has none")
    return module


def _loader(corpus: PackedCorpus, indices: list[int], batch_size: int) -> DataLoader:
    return DataLoader(indices, batch_size=batch_size, collate_fn=corpus.collate)


def _cosine(inputs: BaselineInputs) -> Parts:
    job, layers, task = inputs.job, inputs.layers, CausalLMTask()
    scorers = CosineScorers(collect_gradients(job.model, task, job.batches, layers))
    names = [layer.name for layer in layers]

    def heat(needed: list[int]) -> dict[int, Tensor]:
        raw = _token_heat(job.model, scorers.unit, job.corpus, needed, job.config.batch_size)
        norms = gradient_norms(job.model, task, _loader(job.corpus, needed,
                                                        job.config.batch_size), names)
        return {i: raw[i] / n if n > 0 else raw[i] * 0.0 for i, n in zip(needed, norms.tolist())}

    return Parts(lambda m, t, loader, on_scores, p: scorers.scan(m, t, loader, on_scores, p),
                 heat, "Token t's score is its token-wise gradient dot product with the unit "
                 "query gradient, divided by the sequence's gradient norm.", names)


def _repsim(given: BaselineInputs) -> Parts:
    job, task = given.job, CausalLMTask()
    module = output_representation(job.model)
    represent = module_input_representation(task, module)
    queries = collect_representations(job.model, job.batches, represent)  # (Q, D)
    unit = unit_rows(queries)
    inputs = module_inputs(task, module)

    def heat(needed: list[int]) -> dict[int, Tensor]:
        out: dict[int, Tensor] = {}
        device = next(job.model.parameters()).device
        with evaluation(job.model), torch.no_grad():
            for start in range(0, len(needed), job.config.batch_size):
                part = needed[start : start + job.config.batch_size]
                batch = {k: v.to(device) for k, v in job.corpus.collate(part).items()}
                x, real = inputs(job.model, batch)  # (B, T, D), (B, T)
                x = (x.double() * real[..., None]).cpu()
                n = real.sum(1).cpu().clamp_min(1)  # (B,)
                mean_norm = (x.sum(1) / n[:, None]).norm(dim=1)  # ‖h̄‖, (B,)
                for b, i in enumerate(part):
                    scale = 1.0 / (n[b] * mean_norm[b]) if mean_norm[b] > 0 else 0.0
                    out[i] = (unit @ x[b].t()) * scale  # (Q, T)
        return out

    return Parts(lambda m, t, loader, on_scores, p:
                 representation_scan(m, loader, represent, queries, on_scores, p), heat,
                 "Token t's score is the cosine's share of its last hidden state: "
                 "<q, h_t> / (n |mean h|).", [])


def _bm25(given: BaselineInputs) -> Parts:
    job = given.job
    with rank_zero_first():  # under torchrun, rank 0 builds the index and the others read it
        index = bm25_index(job.corpus, given.workdir, given.ignore_ids)
    queries = [np.unique(ids[mask.bool()].numpy()) for batch in job.batches
               for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    scores = torch.as_tensor(np.stack([index.scores(q) for q in queries]))  # (Q, C)

    def scanner(model, task, loader, on_scores, progress) -> None:
        first = 0
        for batch in progress_bar(loader, desc="bm25", enabled=progress):
            idx = batch["index"]
            on_scores(first, scores[:, idx].t()[..., None].double())  # (B, Q, 1)
            first += len(idx)

    def heat(needed: list[int]) -> dict[int, Tensor]:
        ids = {i: job.corpus.input_ids(i)[: job.corpus.length(i)].numpy() for i in needed}
        out = {i: torch.zeros(len(queries), job.corpus.seq_len, dtype=torch.float64)
               for i in needed}
        for q, tokens in enumerate(queries):
            for t in tokens.tolist():
                term = index.scores([t])[needed]  # this token's BM25 term in each sequence
                for i, value in zip(needed, term.tolist()):
                    where = np.flatnonzero(ids[i] == t)
                    if value and where.size:
                        out[i][q, int(where[0])] += value
        return out

    return Parts(scanner, heat, "Each distinct query token's BM25 term sits on its first "
                 "occurrence in the sequence.", [])


for _method in (
    TraceMethod("ekfac", "EK-FAC influence (Grosse et al. 2023)", curvature="ekfac"),
    TraceMethod("kfac", "K-FAC influence", curvature="kfac"),
    TraceMethod("diagonal", "diagonal-Fisher influence", curvature="diagonal"),
    TraceMethod("dot", "gradient dot product (identity curvature)", curvature="identity"),
    TraceMethod("cosine", "unit-normalised gradients (TrackStar)", baseline=_cosine),
    TraceMethod("repsim", "representation similarity (mean last hidden state)",
                baseline=_repsim),
    TraceMethod("bm25", "BM25 over token ids (word overlap)", baseline=_bm25),
):
    register_method(_method)


def run_baseline_trace(
    model: nn.Module, tokenizer: Any, corpus: PackedCorpus, method: TraceMethod,
    layers: list[TrackedLayer], queries: Any, out_dir: str | Path,
    config: TraceConfig, *, model_name: str = "", corpus_name: str = "",
    candidates_k: int | None = None, workdir: str | Path | None = None,
    all_scores: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Trace every query with a baseline ``method``; write results.json (reused if inputs
    match) and results.parquet. ``queries`` as for :func:`~datasleuth.lm.pipeline.run_trace`;
    ``candidates_k`` restricts the scan to the BM25 top-k per query."""
    if method.baseline is None:
        raise DatasleuthError(f"{method.name!r} is an influence method; use run_trace")
    check_context(model, corpus.seq_len)
    out = Path(out_dir)
    queries = render_chat(load_queries(queries), tokenizer)
    key = _digest({"queries": [asdict(q) for q in queries], "corpus": corpus.fingerprint,
                   "config": asdict(config), "method": method.name,
                   "model": model_fingerprint(model, layers), "candidates_k": candidates_k,
                   "all_scores": all_scores})
    previous = _reusable(out / "results.json", key)
    if previous is not None:
        return _written(previous, corpus, out, table_only=True)
    header = {"model": model_name, "corpus": corpus_name, "input_digest": key}
    job, warnings = _trace_job(model, tokenizer, corpus, None, queries, config, out, header,
                               candidates_k=candidates_k, workdir=workdir or out,
                               all_scores=all_scores, progress=progress)
    ignore = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
    parts = method.baseline(BaselineInputs(job, layers, Path(workdir or out), ignore))
    scan = scan_corpus(model, None, corpus, config, candidates=job.candidates,
                       scores_dir=job.scores_dir, query_ids=job.query_ids,
                       scanner=parts.scanner, progress=progress, checkpoint=job.checkpoint,
                       run_key=f"{key}:{method.name}",
                       shape=(len(job.rows), max(len(parts.layers), 1)))
    results = trace_details(model, dict.fromkeys(parts.layers), corpus, scan, job.rows, config,
                            header, heat=parts.heat, note=parts.note)
    results["warnings"] = warnings
    results["config"].update(method=method.name, curvature=None, candidates_k=candidates_k,
                             layers=parts.layers, first_stage={"kind": "full"},
                             corpus_fingerprint=corpus.fingerprint, seq_len=corpus.seq_len)
    return _written(results, corpus, out)
