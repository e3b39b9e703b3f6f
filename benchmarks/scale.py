"""Scan, query batching and the projected-gradient index, side by side in one run.

One GPT-2 built from a config (no download), briefly trained on a corpus drawn from a
random sparse bigram chain (so gradients have structure), its MLP layers tracked, and
EK-FAC fitted on the corpus. Then, over the same corpus and timed in interleaved
rounds (median), each as a ratio to one plain training forward+backward pass over
the corpus (``loss.backward()`` into every weight):

* the plain full-rank scan (:func:`datasleuth.scan_scores`) with 1 and 16 queries
  (``--full-queries``);
* query batching (:func:`datasleuth.scale.scan_low_rank`, rank ``--rank``) with 1, 16
  and 256 queries on the token path of Grosse et al. (the default), and with 256
  queries on the path that rebuilds chunks of L R;
* the index: build (one-off), exact and FAISS HNSW search of every query.

Agreement with full EK-FAC over the 16 queries (Pearson r per query, averaged, and
top-100 overlap) of rank-k scores and of projected-index scores; recall@100 of
approximate against exact index search; index bytes per sequence; memory held by the
queries in each mode. Prints a Markdown table.

    python benchmarks/scale.py --quick                     # smoke test, seconds
    python benchmarks/scale.py                             # ~minutes on 2 CPU cores
    python benchmarks/scale.py --device cuda --n-seq 4096 --seq-len 512 --n-layer 12 \\
        --n-embd 768 --train-steps 300                     # GPT-2-small shape on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from datasleuth import FitConfig, find_layers, fit_curvature, precondition_queries  # noqa: E402
from datasleuth.evaluation.metrics import top_k_overlap  # noqa: E402
from datasleuth.lm.task import CausalLMTask  # noqa: E402
from datasleuth.scale import (  # noqa: E402
    IndexConfig,
    LowRankQueries,
    build_index,
    fit_projected_curvature,
    scan_low_rank,
)
from datasleuth.scale.batching import memory_numbers  # noqa: E402
from datasleuth.scoring import scan_scores  # noqa: E402

Batch = dict[str, torch.Tensor]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-seq", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--proj-dim", type=int, default=16)
    p.add_argument("--more-proj-dims", default="32,64",
                   help="also report agreement of indexes with these projection sizes")
    p.add_argument("--full-queries", default="1,16",
                   help="query counts for the full-rank scan (256 needs Q x P x M memory)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.n_seq, a.seq_len, a.n_layer, a.n_embd, a.train_steps, a.rounds = 64, 32, 2, 64, 20, 1
    return a


def _bigram_corpus(n: int, t: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(n, t) token ids from a random chain where each token has 8 likely successors."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 8), generator=g)
    ids = torch.empty(n, t, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for j in range(1, t):
        pick = torch.randint(0, 8, (n,), generator=g)
        ids[:, j] = succ[ids[:, j - 1], pick]
    noise = torch.rand(n, t, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, vocab, (n, t), generator=g), ids)


def _batch(ids: torch.Tensor, prompt: int = 0) -> Batch:
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    return float(r.mean())


_T0 = time.perf_counter()


def _phase(what: str) -> None:
    """Where the time goes, on stderr as it happens (the table comes at the end)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {what}", file=sys.stderr, flush=True)


def main() -> None:
    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.n_embd,
                     n_layer=args.n_layer, n_head=max(1, args.n_embd // 64), resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).to(device)
    ids = _bigram_corpus(args.n_seq, args.seq_len, args.vocab)
    rows = [_batch(ids[i : i + 1]) for i in range(args.n_seq)]
    items = [{k: v[0] for k, v in r.items()} for r in rows]

    def collate(batch: list[Batch]) -> Batch:
        return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}

    loader = DataLoader(items, batch_size=args.batch_size, collate_fn=collate)
    batches = list(loader)
    task = CausalLMTask()

    _phase(f"training {args.train_steps} steps")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(args.train_steps):
        b = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
        opt.zero_grad(set_to_none=True)
        task.loss(model, b).sum().div(b["input_ids"].numel()).backward()
        opt.step()
    model.eval()
    layers = find_layers(model, ["*.mlp.c_fc", "*.mlp.c_proj"])

    # 256 queries: corpus sequences, prompt = first half, completion = second half.
    half = args.seq_len // 2
    q_ids = ids[torch.arange(256) % args.n_seq]
    q_all = [_batch(q_ids[i : i + 16], prompt=half) for i in range(0, 256, 16)]
    _phase("fitting EK-FAC")
    t0 = time.perf_counter()
    curv = fit_curvature(model, task, batches, layers, FitConfig(), progress=False)
    fit_s = time.perf_counter() - t0
    _phase("preconditioning and compressing queries")
    pre16 = precondition_queries(model, task, curv, q_all[:1], progress=False)
    pre = {1: {k: v[:1] for k, v in pre16.items()}, 16: pre16}
    full_counts = [int(x) for x in args.full_queries.split(",") if x]
    if 256 in full_counts:
        pre[256] = precondition_queries(model, task, curv, q_all, progress=False)
    low = {n: LowRankQueries.from_preconditioned(pre16, args.rank) for n in (16,)}
    low[1] = LowRankQueries.from_preconditioned(pre[1], args.rank)
    low[256] = LowRankQueries.cat([LowRankQueries.from_preconditioned(
        precondition_queries(model, task, curv, [qb], progress=False), args.rank)
        for qb in q_all])

    def floor() -> None:
        model.train()
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            model.zero_grad(set_to_none=True)
            task.loss(model, b).sum().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    def full_scan(n: int, out: list | None = None) -> Callable[[], None]:
        return lambda: scan_scores(model, task, pre[n], batches,
                                   lambda s, x: out.append(x.sum(-1).cpu()) if out is not None
                                   else None, progress=False)

    def low_scan(n: int, out: list | None = None, path: str = "auto") -> Callable[[], None]:
        return lambda: scan_low_rank(model, task, low[n], batches,
                                     lambda s, x: out.append(x.sum(-1).cpu()) if out is not None
                                     else None, progress=False, path=path)

    configs: dict[str, Callable[[], None]] = {"forward+backward (floor)": floor}
    for n in full_counts:
        configs[f"full-rank scan, {n} quer{'y' if n == 1 else 'ies'}"] = full_scan(n)
    for n in (1, 16, 256):
        configs[f"rank-{args.rank} scan, {n} quer{'y' if n == 1 else 'ies'}"] = low_scan(n)
    configs[f"rank-{args.rank} scan, 256 queries, reconstruct path"] = low_scan(
        256, path="reconstruct")

    _phase("building the index")
    tmp = tempfile.TemporaryDirectory()
    icfg = IndexConfig(k_in=args.proj_dim, k_out=args.proj_dim, dtype="float16",
                       shard_size=max(256, args.n_seq // 4))
    build_s = _timed(lambda: build_index(model, task, items, layers, tmp.name, icfg,
                                         batch_size=args.batch_size, collate_fn=collate,
                                         progress=False), device)
    from datasleuth.scale import GradientIndex

    index = GradientIndex.open(tmp.name)
    fit_projected_curvature(model, task, batches, index, progress=False)
    q_index = index.flatten(precondition_queries(model, task, index.curvature, q_all,
                                                 features=index.features))  # (256, D)
    index.search(q_index[:1], k=100, exact=False)  # build the HNSW graph outside the timing
    configs["index search (exact), 256 queries"] = lambda: index.search(q_index, k=100)
    configs["index search (HNSW), 256 queries"] = lambda: index.search(q_index, k=100,
                                                                        exact=False)

    _phase("timing")
    floor()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for name, fn in configs.items():
            times[name].append(_timed(fn, device))
            _phase(f"round {r + 1}: {name} {times[name][-1]:.3f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["forward+backward (floor)"]

    _phase("agreement")
    # Agreement over the first 16 queries.
    got_full: list[torch.Tensor] = []
    full_scan(16, got_full)()
    ref = torch.cat(got_full).t()  # (16, N)
    got_low: list[torch.Tensor] = []
    low_scan(16, got_low)()
    lowr = torch.cat(got_low).t()
    idx_scores = index.scores(q_index[:16].float())  # (16, N)
    k = min(100, args.n_seq)
    exact_i, _ = index.search(q_index, k=k)
    ann_i, _ = index.search(q_index, k=k, exact=False)
    recall = statistics.mean(len(set(a.tolist()) & set(b.tolist())) / k
                             for a, b in zip(exact_i, ann_i))
    shapes = {ly.name: ly.grad_shape for ly in layers}
    bytes_per_seq = index.bytes_per_row
    wider = {}  # agreement of larger projections (the same build, other directories)
    for dim in [int(x) for x in args.more_proj_dims.split(",") if x]:
        other = os.path.join(tmp.name, f"k{dim}")
        cfg_k = IndexConfig(k_in=dim, k_out=dim, dtype="float16", shard_size=icfg.shard_size)
        gi = build_index(model, task, items, layers, other, cfg_k, batch_size=args.batch_size,
                         collate_fn=collate, progress=False)
        fit_projected_curvature(model, task, batches, gi, progress=False)
        got = gi.scores(gi.flatten(precondition_queries(model, task, gi.curvature, q_all[:1],
                                                        features=gi.features)).float())
        wider[dim] = (got, gi.bytes_per_row)

    print(f"\nGPT-2 {args.n_layer}x{args.n_embd}, {args.n_seq} sequences x {args.seq_len} "
          f"tokens, {len(layers)} MLP layers tracked, device {device}, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds (median); EK-FAC fit "
          f"{fit_s:.1f} s\n")
    print("| method | seconds | × forward+backward |")
    print("|---|---:|---:|")
    for name, s in med.items():
        print(f"| {name} | {s:.3f} | {s / base:.2f} |")
    print(f"| index build (one-off, {args.proj_dim}x{args.proj_dim} per layer) | "
          f"{build_s:.3f} | {build_s / base:.2f} |")
    per_q = {m: med[f"index search ({m}), 256 queries"] / 256 * 1e3 for m in ("exact", "HNSW")}
    print(f"\nindex search: exact {per_q['exact']:.3f} ms/query, HNSW {per_q['HNSW']:.3f} "
          f"ms/query over {index.rows} sequences; recall@{k} of HNSW vs exact {recall:.3f}; "
          f"{bytes_per_seq} bytes per sequence (float16)\n")
    print(f"| agreement with full EK-FAC (16 queries) | Pearson r | top-{k} overlap |")
    print("|---|---:|---:|")
    print(f"| rank-{args.rank} query batching | {_pearson_rows(lowr, ref):.4f} | "
          f"{top_k_overlap(lowr, ref, k):.3f} |")
    print(f"| projected index ({args.proj_dim}x{args.proj_dim}, {bytes_per_seq} B/sequence) | "
          f"{_pearson_rows(idx_scores, ref):.4f} | {top_k_overlap(idx_scores, ref, k):.3f} |")
    for dim, (got, size) in wider.items():
        print(f"| projected index ({dim}x{dim}, {size} B/sequence) | "
              f"{_pearson_rows(got, ref):.4f} | {top_k_overlap(got, ref, k):.3f} |")
    full_mib = memory_numbers(shapes, 1, None) * 4 / 2**20
    low_mib = memory_numbers(shapes, 1, args.rank) * 4 / 2**20
    print(f"\nquery memory per query (float32): full rank {full_mib:.2f} MiB, rank "
          f"{args.rank} {low_mib:.3f} MiB ({full_mib / low_mib:.1f}x less)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
