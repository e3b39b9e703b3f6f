"""Many low-rank queries against one training pass, interleaved, at GPT-2's block shape.

The ``shapes.py`` GPT-2 block (768 wide, 3072-wide MLP, both MLP layers tracked,
vocabulary 8192, random weights), 128 training sequences of 128 tokens. EK-FAC is
fitted and the queries compressed once; then, per round and per batch size, a
training forward+backward over the corpus, the low-rank scan with the path chosen by
cost (``auto``) and with the token path forced, timed back to back. Prints each round
and the medians, as ratios to the training pass at the same batch size.

    python benchmarks/query_batching.py --batch-sizes 8,64,128 --rounds 3   # ~10 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DATASLEUTH_PROGRESS", "0")

import shapes  # noqa: E402

from datasleuth import FitConfig, find_layers, fit_curvature  # noqa: E402
from datasleuth.lm.task import CausalLMTask  # noqa: E402
from datasleuth.scale.batching import compress_queries, scan_low_rank  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="8,64,128")
    p.add_argument("--n-seq", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, patterns = shapes._model("gpt2", 1, args.seq_len)
    model.eval()
    layers, task = find_layers(model, patterns), CausalLMTask()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shapes.VOCAB, (args.n_seq, args.seq_len), generator=g)
    q_ids = torch.randint(0, shapes.VOCAB, (args.queries, args.seq_len), generator=g)
    queries = [shapes._batch(q_ids[i:i + 16], args.seq_len // 2)
               for i in range(0, args.queries, 16)]
    fit_batches = [shapes._batch(ids[i:i + 8]) for i in range(0, args.n_seq, 8)]
    curvature = fit_curvature(model, task, fit_batches, layers, FitConfig(), progress=False)
    low = compress_queries(model, task, curvature, queries, args.rank)
    print(f"GPT-2 block, {args.n_seq} x {args.seq_len} tokens, {args.queries} rank-{args.rank} "
          f"queries, {args.threads} threads")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        batches = [shapes._batch(ids[i:i + b]) for i in range(0, args.n_seq, b)]

        def train(batches=batches) -> None:
            model.train()
            for batch in batches:
                model.zero_grad(set_to_none=True)
                task.loss(model, batch).sum().backward()
            model.zero_grad(set_to_none=True)
            model.eval()

        def scan(path: str, batches=batches) -> None:
            scan_low_rank(model, task, low, batches, lambda i, s: None, progress=False,
                          path=path)

        train()  # warm-up: first-touch allocation at this batch size
        scan("auto")
        times: dict[str, list[float]] = {"train": [], "auto": [], "tokens": []}
        for r in range(args.rounds):
            times["train"].append(_timed(train))
            times["auto"].append(_timed(lambda: scan("auto")))
            times["tokens"].append(_timed(lambda: scan("tokens")))
            t = times["train"][-1]
            print(f"  batch {b} round {r}: forward+backward {t:.2f} s, auto "
                  f"{times['auto'][-1] / t:.2f}x, tokens {times['tokens'][-1] / t:.2f}x")
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"batch {b}: forward+backward {med['train']:.2f} s; auto {med['auto']:.2f} s "
              f"({med['auto'] / med['train']:.2f}x); tokens {med['tokens']:.2f} s "
              f"({med['tokens'] / med['train']:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
