"""Benchmark of the projected-gradient index (METHOD.md §7; Choe et al. 2024, LoGra).

On a small GPT-2 built from a config (4 blocks, width 256, float32, random weights) and
a random-token corpus, measures in one run:

* the floor: one plain training forward + backward pass over the corpus;
* index build time (and its ratio to the floor), bytes stored per sequence;
* query time of exact search and of FAISS approximate search (ms per query, 16 queries),
  recall@100 of approximate against exact;
* agreement of projected-index scores with full EK-FAC ``pairwise_scores`` fitted on the
  same corpus: Pearson r (per query, averaged; and over all pairs) and top-100 overlap.

Queries are 16 corpus sequences split into a prompt (first half) and a completion, so
each query's own training sequence should rank first. Prints a Markdown table.

    python benchmarks/index.py            # 512 sequences x 128 tokens, < 4 min on 2 cores
    python benchmarks/index.py --quick    # 128 x 64, seconds
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from datasleuth import FitConfig, fit_curvature, pairwise_scores
from datasleuth.lm.task import CausalLMTask
from datasleuth.scale.index import IndexConfig, build_index, fit_projected_curvature

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")


def _collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack(rows)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "index": torch.arange(len(rows))}


def _batches(corpus: list[torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    return [_collate(corpus[i : i + size]) for i in range(0, len(corpus), size)]


def _queries(corpus: list[torch.Tensor], n: int) -> tuple[list[dict], list[int]]:
    """n corpus sequences as (prompt = first half, completion = second half) queries."""
    sources = [int(i) for i in np.linspace(0, len(corpus) - 1, n).round()]
    batch = _collate([corpus[i] for i in sources])
    batch["labels"][:, : corpus[0].shape[0] // 2] = -100
    return [{k: v[i : i + 4] for k, v in batch.items()} for i in range(0, n, 4)], sources


def _overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)]))


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy())[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 sequences x 64 tokens")
    ap.add_argument("--k-in", type=int, default=16)
    ap.add_argument("--k-out", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    n_seq, seq_len = (128, 64) if args.quick else (512, 128)
    top = 100 if n_seq >= 500 else 20
    n_queries, vocab = 16, 4096

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=256, n_layer=4, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).float().eval()
    g = torch.Generator().manual_seed(1)
    corpus = list(torch.randint(0, vocab, (n_seq, seq_len), generator=g))
    batches = _batches(corpus, args.batch_size)
    queries, sources = _queries(corpus, n_queries)
    task = CausalLMTask()
    layers = ["*.mlp.*"]
    results: list[tuple[str, str]] = []

    start = time.perf_counter()
    for batch in batches:  # the floor: a plain training forward + backward pass
        model.zero_grad(set_to_none=True)
        task.loss(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)
    floor = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "index"
        config = IndexConfig(k_in=args.k_in, k_out=args.k_out, dtype="float16",
                             shard_size=128)
        start = time.perf_counter()
        index = build_index(model, task, corpus, layers, out, config,
                            batch_size=args.batch_size, collate_fn=_collate, progress=False)
        build = time.perf_counter() - start
        shard_bytes = sum((out / s["file"]).stat().st_size for s in index.shards)

        start = time.perf_counter()
        fit_projected_curvature(model, task, batches, index, progress=False)
        fit_proj = time.perf_counter() - start
        start = time.perf_counter()
        q_pre = index.precondition_queries(model, task, queries)  # (Q, D)
        precond = time.perf_counter() - start

        index.search(q_pre, k=top)  # warm the page cache
        start = time.perf_counter()
        exact_ids, _ = index.search(q_pre, k=top)
        exact_ms = (time.perf_counter() - start) * 1e3 / n_queries
        start = time.perf_counter()
        index.search(q_pre, k=top, exact=False)  # builds and saves the FAISS index
        ann_build = time.perf_counter() - start
        start = time.perf_counter()
        ann_ids, _ = index.search(q_pre, k=top, exact=False)
        ann_ms = (time.perf_counter() - start) * 1e3 / n_queries
        recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / top
                                for a, b in zip(ann_ids, exact_ids)]))
        projected = index.scores(q_pre)  # (Q, N)

    start = time.perf_counter()
    ekfac = fit_curvature(model, task, batches, layers, FitConfig(curvature="ekfac"),
                          progress=False)
    fit_ekfac = time.perf_counter() - start
    start = time.perf_counter()
    full = pairwise_scores(model, task, ekfac, queries, batches, progress=False).total
    score_ekfac = time.perf_counter() - start

    per_query = float(np.mean([_pearson(a, b) for a, b in zip(projected, full)]))
    others = torch.ones_like(full, dtype=torch.bool)
    others[torch.arange(n_queries), torch.tensor(sources)] = False  # drop the own sequence
    per_query_others = float(np.mean([_pearson(a[m], b[m])
                                      for a, b, m in zip(projected, full, others)]))
    hits = lambda s: float(np.mean([int(s[i].argmax()) == j  # noqa: E731
                                    for i, j in enumerate(sources)]))
    results += [
        ("corpus", f"{n_seq} sequences x {seq_len} tokens, vocab {vocab}"),
        ("model", "GPT-2 4 x 256 float32; tracked: 8 MLP layers"),
        ("projection", f"k_out={args.k_out}, k_in={args.k_in}, D={index.dim}, float16 rows"),
        ("torch threads / 1-min load average", f"{torch.get_num_threads()} / "
                                                f"{os.getloadavg()[0]:.1f}"),
        ("floor: training fwd+bwd over corpus", f"{floor:.2f} s"),
        ("index build", f"{build:.2f} s ({build / floor:.2f} x floor)"),
        ("index bytes per sequence", f"{shard_bytes / index.rows:.0f} B "
                                     f"(payload {index.dim * 2} B)"),
        ("projected curvature fit (1 pass)", f"{fit_proj:.2f} s"),
        ("precondition 16 queries", f"{precond * 1e3:.0f} ms"),
        (f"exact search, top-{top}", f"{exact_ms:.3f} ms/query"),
        (f"FAISS HNSW search, top-{top}", f"{ann_ms:.3f} ms/query "
                                          f"(index built once in {ann_build:.2f} s)"),
        (f"recall@{top} approx vs exact", f"{recall:.3f}"),
        ("EK-FAC fit (2 passes) / pairwise scores", f"{fit_ekfac:.2f} s / {score_ekfac:.2f} s"),
        ("Pearson vs EK-FAC, mean per query", f"{per_query:.3f}"),
        ("Pearson vs EK-FAC, all pairs", f"{_pearson(projected, full):.3f}"),
        ("Pearson vs EK-FAC, per query without its own sequence", f"{per_query_others:.3f}"),
        (f"top-{top} overlap vs EK-FAC", f"{_overlap(projected, full, top):.3f}"),
        ("own sequence ranked 1st (index / EK-FAC)",
         f"{hits(projected):.2f} / {hits(full):.2f}"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in results:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
