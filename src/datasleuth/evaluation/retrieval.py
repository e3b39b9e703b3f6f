"""Sections of the suite for fact tracing: retrieval of teaching examples, tail-patch (§10).

Given every method's (Q, N) scores on a problem:

* :func:`retrieval_section`: recall@k and MRR of each query's known teaching examples
  (``Problem.relevant``), per query group (``Problem.query_groups``, e.g. training
  wording vs reworded);
* :func:`tail_patch_section`: tail-patch each method's top-k per query
  (:func:`~datasleuth.evaluation.tail_patch.tail_patch`), beside k random examples and,
  when they are known, the teaching examples themselves (the ceiling of what a ranking
  can give), summarised per query group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from datasleuth.evaluation.metrics import retrieval_scores
from datasleuth.evaluation.recipes import Problem
from datasleuth.evaluation.tail_patch import TailPatchConfig, summarise, tail_patch

__all__ = ["TEACHING", "retrieval_section", "retrieval_table", "tail_patch_section",
           "tail_patch_group_table"]

TEACHING = "teaching documents"
"""Name of the reference ranking made of each query's known teaching examples."""


def _labels(problem: Problem, n_queries: int) -> list[str]:
    """Each query's group ("all" when the recipe has none)."""
    return [str(g) for g in problem.query_groups] if problem.query_groups else ["all"] * n_queries


def _groups(problem: Problem, n_queries: int) -> dict[str, list[int]]:
    """Query indices per group, in first-seen order."""
    out: dict[str, list[int]] = {}
    for q, label in enumerate(_labels(problem, n_queries)):
        out.setdefault(label, []).append(q)
    return out


def retrieval_section(problem: Problem, scores: Mapping[str, np.ndarray],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any] | None:
    """Recall@k and MRR of the relevant examples for every method, per query group.

    ``None`` when the recipe marks no relevant examples.
    """
    if problem.relevant is None:
        return None
    n_queries = len(problem.relevant)
    groups = _groups(problem, n_queries)
    ks = [k for k in ks if k <= problem.n_train]
    per_method = {name: retrieval_scores(s, problem.relevant, ks) for name, s in scores.items()}
    summary = {
        group: {name: {**{f"recall@{k}": float(np.mean([r["recall"][k][q] for q in qs]))
                          for k in ks},
                       "mrr": float(np.mean([r["reciprocal_rank"][q] for q in qs]))}
                for name, r in per_method.items()}
        for group, qs in groups.items()
    }
    sizes = [len(set(r)) for r in problem.relevant]
    return {"ks": ks, "groups": summary, "per_method": per_method,
            "query_groups": _labels(problem, n_queries),
            "relevant_per_query": {"mean": float(np.mean(sizes)), "min": min(sizes),
                                   "max": max(sizes)}}


def _fmt(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def retrieval_table(section: Mapping[str, Any], labels: Mapping[str, str] | None = None,
                    ks: Sequence[int] | None = None) -> str:
    """Method | recall@k (for ``ks``, default all) and MRR per query group, as Markdown."""
    ks = list(ks) if ks is not None else list(section["ks"])
    groups = list(section["groups"])
    parts = [f"recall@{k}" for k in ks] + ["MRR"]
    head = ["method"] + [f"{part} ({g})" for g in groups for part in parts]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in next(iter(section["groups"].values())):
        cells = [(labels or {}).get(name, name)]
        for g in groups:
            s = section["groups"][g][name]
            cells += [_fmt(s[part.lower()]) for part in parts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tail_patch_section(problem: Problem, scores: Mapping[str, np.ndarray],
                       config: TailPatchConfig) -> dict[str, Any]:
    """Tail-patch every method's top-k per query, with random and teaching references."""
    rankings = {name: np.argsort(-s, axis=1, kind="stable")[:, : config.k].tolist()
                for name, s in scores.items()}
    if problem.relevant is not None:
        rankings[TEACHING] = [sorted(set(map(int, r))) for r in problem.relevant]
    collate = problem.query_collate or problem.collate or torch.utils.data.default_collate
    train_collate = problem.collate or torch.utils.data.default_collate
    queries = [collate([problem.queries[q]]) for q in range(len(problem.queries))]
    doc = tail_patch(problem.model, problem.task, queries, rankings,
                     lambda idx: train_collate([problem.train[int(i)] for i in idx]),
                     problem.n_train, config)
    groups = _groups(problem, len(queries))
    doc["groups"] = {g: summarise([doc["queries"][q] for q in qs], list(rankings))
                     for g, qs in groups.items()}
    doc["query_groups"] = _labels(problem, len(queries))
    return doc


def tail_patch_group_table(doc: Mapping[str, Any], labels: Mapping[str, str] | None = None
                           ) -> str:
    """Method | mean Δ f per query group (± sd over queries), as Markdown."""
    groups = list(doc["groups"])
    head = ["top-k of"] + [f"mean Δ f ({g})" for g in groups]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(groups)]
    for name in doc["groups"][groups[0]]:
        label = (labels or {}).get(name, name)
        if name == "random":
            label = f"random ({doc['config']['draws']} draws per query)"
        cells = [label]
        for g in groups:
            s = doc["groups"][g][name]
            sd = "" if s["std"] is None else f" ± {s['std']:.4f}"
            cells.append("—" if s["mean"] is None else f"{s['mean']:+.4f}{sd}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
