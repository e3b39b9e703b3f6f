"""Benchmark query batching (METHOD.md §4; Grosse et al. 2023, §3.2.2) on a small GPT-2.

Builds a random GPT-2 from a config (no download), a random token corpus, and EK-FAC
curvature of its MLP layers fitted on a few batches, then times, in one run:

* the floor: one plain training forward + backward pass over the corpus
  (``model.train()`` with dropout off, ``loss.backward()`` into every parameter);
* the full-rank scan (:func:`datasleuth.scoring.scan_scores`) with 1 and 16 queries;
* the low-rank scan (:func:`datasleuth.scale.batching.scan_low_rank`) with 1, 16 and
  256 queries at rank k.

and compares rank-k with full-rank scores of the 16 queries (Pearson, top-100 overlap).
The 256 low-rank queries are the 16 compressed queries repeated 16 times: the scan's
cost depends only on shapes, and this keeps the benchmark short.

    python benchmarks/query_batching.py           # ~256 sequences x 128 tokens
    python benchmarks/query_batching.py --quick   # smaller corpus, for a smoke test

Timings use one thread by default (``--threads``): on a machine shared with other
processes, MKL/OpenMP parallel regions stall waiting for descheduled threads and
multi-threaded times (of eigh and svd above all) swing by 10-100x. Configurations are
interleaved in rounds over the same batches, and ratios are given both as the median of
per-round ratios and as ratios of totals.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from datasleuth import FitConfig, find_layers, fit_curvature, scan_scores  # noqa: E402
from datasleuth.evaluation.metrics import correlations, top_k_overlap  # noqa: E402
from datasleuth.lm.task import CausalLMTask  # noqa: E402
from datasleuth.scale.batching import LowRankQueries, memory_numbers, scan_low_rank  # noqa: E402
from datasleuth.scoring import precondition_queries  # noqa: E402

Batch = dict[str, torch.Tensor]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64 sequences x 64 tokens")
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--fit-batches", type=int, default=2)
    p.add_argument("--round-batches", type=int, default=4, help="batches per timing round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default because OpenMP threads that wait on each "
                   "other make multi-threaded timings erratic on a shared machine")
    args = p.parse_args()
    if args.quick:
        args.sequences, args.tokens = 64, 64
    return args


def _model(args: argparse.Namespace) -> GPT2LMHeadModel:
    torch.manual_seed(args.seed)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.tokens, n_embd=args.n_embd,
                     n_layer=args.n_layer, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).float()


def _corpus(args: argparse.Namespace) -> list[Batch]:
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.sequences, args.tokens), generator=g)  # (N, T)
    batches = []
    for s in range(0, args.sequences, args.batch_size):
        x = ids[s : s + args.batch_size]
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone(),
                        "index": torch.arange(s, s + len(x))})
    return batches


def _queries(corpus: list[Batch], n: int, batch_size: int) -> list[Batch]:
    """``n`` corpus sequences as queries: first half prompt, second half completion."""
    ids = torch.cat([b["input_ids"] for b in corpus])
    rows = ids[torch.linspace(0, len(ids) - 1, n).long()]  # (n, T)
    labels = rows.clone()
    labels[:, : rows.shape[1] // 2] = -100
    return [{"input_ids": rows[s : s + batch_size], "labels": labels[s : s + batch_size],
             "attention_mask": torch.ones_like(rows[s : s + batch_size])}
            for s in range(0, n, batch_size)]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _Run:
    """One timed configuration: a pass over some batches, its per-round times and scores."""

    def __init__(self, name: str, queries: str, scan: Callable[[list[Batch], list], None],
                 gflop: float, memory_mb: float | None):
        self.name, self.queries, self.scan = name, queries, scan
        self.gflop, self.memory_mb = gflop, memory_mb
        self.times: list[float] = []
        self.scores: list[torch.Tensor] = []  # (B, Q) per batch, corpus order

    def __call__(self, batches: list[Batch]) -> None:
        self.times.append(_timed(lambda: self.scan(batches, self.scores)))


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    model, task = _model(args), CausalLMTask()
    corpus = _corpus(args)
    layers = find_layers(model, ["*.mlp.*"])
    shapes = {layer.name: layer.grad_shape for layer in layers}
    n, t_len, k = args.sequences, args.tokens, args.rank

    # Setup in one thread: MKL's multi-threaded eigh/svd slow down a hundredfold when
    # other processes compete for the cores (OpenMP threads wait on each other).
    with _threads(1):
        start = time.perf_counter()
        curv = fit_curvature(model, task, corpus[: args.fit_batches], layers, FitConfig(),
                             progress=False)
        t_fit = time.perf_counter() - start
        start = time.perf_counter()
        pre16 = precondition_queries(model, task, curv, _queries(corpus, 16, args.batch_size))
        t_pre = time.perf_counter() - start
        start = time.perf_counter()
        lr16 = LowRankQueries.from_preconditioned(pre16, k)
        t_svd = time.perf_counter() - start
    full_sets = {1: {name: v[:1] for name, v in pre16.items()}, 16: pre16}
    low_sets = {1: lr16.select([0]), 16: lr16, 256: LowRankQueries.cat([lr16] * 16)}

    def floor(batches: list[Batch], _: list) -> None:
        model.train()  # dropout probabilities are 0: the same function as in eval mode
        for batch in batches:
            model.zero_grad(set_to_none=True)
            task.loss(model, batch).sum().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    def full_scan(pre: dict[str, torch.Tensor]) -> Callable[[list[Batch], list], None]:
        return lambda batches, out: scan_scores(
            model, task, pre, batches, lambda i, s: out.append(s.sum(-1)), progress=False)

    def low_scan(queries: LowRankQueries) -> Callable[[list[Batch], list], None]:
        return lambda batches, out: scan_low_rank(
            model, task, queries, batches, lambda i, s: out.append(s.sum(-1)), progress=False)

    runs = [_Run("training fwd+bwd (floor)", "-", floor, 0.0, None)]
    for q, pre in full_sets.items():
        gflop = 2 * n * sum(p * m * (t_len + q) for p, m in shapes.values()) / 1e9
        runs.append(_Run("full-rank `scan_scores`", str(q), full_scan(pre), gflop,
                         memory_numbers(shapes, q, None) * 4 / 2**20))
    for q, queries in low_sets.items():
        gflop = 2 * n * t_len * q * k * sum(p + m + 1 for p, m in shapes.values()) / 1e9
        runs.append(_Run(f"low-rank `scan_low_rank`, k={k}", str(q), low_scan(queries), gflop,
                         queries.memory_bytes() / 2**20))

    for run in runs:  # warm up thread pools, allocator and kernels on one batch
        run.scan(corpus[:1], [])
    # Interleave: every round runs every configuration on the same few batches (in a
    # rotating order), so load from other processes falls on all of them alike.
    step = args.round_batches
    rounds = [corpus[i : i + step] for i in range(0, len(corpus), step)]
    for r, batches in enumerate(rounds):
        for run in runs[r % len(runs):] + runs[: r % len(runs)]:
            run(batches)

    floor_times = torch.tensor(runs[0].times)
    full = torch.cat(runs[2].scores).t()  # (16, N) full rank
    low = torch.cat(runs[4].scores).t()  # (16, N) rank k
    corr = correlations(low, full)
    k_top = min(100, n)
    overlap = top_k_overlap(low, full, k_top)
    pooled = correlations(low.reshape(1, -1), full.reshape(1, -1))["mean_pearson"]

    print(f"\n## Query batching benchmark ({'quick' if args.quick else 'full'})\n")
    print(f"- torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; "
          f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"- GPT-2 n_layer={args.n_layer}, n_embd={args.n_embd}, vocab={args.vocab}: "
          f"{n_params / 1e6:.1f} M parameters; tracked: {len(layers)} MLP layers "
          f"{sorted(set(shapes.values()))} (P, M+1)")
    print(f"- corpus: {n} sequences x {t_len} tokens, batch {args.batch_size}; "
          f"{len(rounds)} interleaved rounds of {step} batches")
    print(f"- one thread: EK-FAC fit on {args.fit_batches} batches {t_fit:.1f} s; precondition "
          f"16 queries {t_pre:.1f} s; rank-{k} SVD of 16 queries {t_svd:.2f} s\n")
    print("| pass | queries | time (s) | × fwd+bwd (median of rounds) | × fwd+bwd (totals) "
          "| scorer GFLOP | query memory (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        times = torch.tensor(run.times)
        ratio = float((times / floor_times).median())
        mem = "-" if run.memory_mb is None else f"{run.memory_mb:.1f}"
        gflop = "-" if not run.gflop else f"{run.gflop:.0f}"
        print(f"| {run.name} | {run.queries} | {times.sum():.2f} | {ratio:.2f} | "
              f"{times.sum() / floor_times.sum():.2f} | {gflop} | {mem} |")
    print(f"\nRank-{k} vs full-rank scores, 16 queries x {n} sequences: mean per-query Pearson "
          f"{corr['mean_pearson']:.4f} (min {min(corr['pearson']):.4f}), pooled Pearson "
          f"{pooled:.4f}, top-{k_top} overlap {overlap:.3f}.")
    print("scorer GFLOP: scoring work on top of the forward and output-gradient backward "
          "passes, 2·N·(T + Q)·P(M+1) at full rank, 2·N·T·Q·k(P+M+1) at rank k, summed over "
          "layers. The 256 low-rank queries are the 16 repeated (cost depends on shapes only).")


if __name__ == "__main__":
    main()
