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
* the index (docs/method.md §11), for 16/32/64/128-wide projections and each whitening
  (``none`` = LoGra, projected curvature refitted; ``kron`` = Kronecker-factored root;
  ``ekfac`` = EK-FAC eigenvalue root): bytes per sequence, build time, and agreement
  with full EK-FAC over ``--queries`` held-out queries (Pearson r per query, averaged;
  top-100 overlap; recall of the full top-10 within the index's top-100);
* search time per query over 10⁴, 10⁵, 10⁶ synthetic rows (``--search-rows``), exact
  (memory-mapped blocks) and approximate (FAISS, method chosen by size), with the
  approximate search's recall@100 against exact.

Agreement of rank-k scores; memory held by the queries in each mode. Prints Markdown
tables. ``--skip-scan`` runs the index and search sections only.

    python benchmarks/scale.py --quick                     # smoke test, seconds
    python benchmarks/scale.py                             # ~minutes on 2 CPU cores
    python benchmarks/scale.py --skip-scan --threads 2     # index sections only
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
from dataclasses import dataclass, replace

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from datasleuth import (  # noqa: E402
    FitConfig,
    RegressionTask,
    find_layers,
    fit_curvature,
    precondition_queries,
)
from datasleuth.curvature import Curvature  # noqa: E402
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
from datasleuth.scale.index import GradientIndex, auto_config, size_report  # noqa: E402
from datasleuth.scale.index.search import choose_method  # noqa: E402
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
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--proj-dims", default="16,32,64,128", help="index widths k (k x k per layer)")
    p.add_argument("--whitenings", default="none,kron,ekfac,ekfac-eigen",
                   help="'-eigen': EK-FAC eigen-coordinate selection instead of a random sketch")
    p.add_argument("--auto-bytes", default="8192,16384",
                   help="also --proj-dim auto within these bytes per sequence")
    p.add_argument("--auto-dtypes", default="float16,int8,int4,int2,int1",
                   help="row storages of the auto-sized variants")
    p.add_argument("--queries", type=int, default=32, help="held-out queries for agreement")
    p.add_argument("--search-rows", default="10000,100000,1000000")
    p.add_argument("--search-dim", type=int, default=1024, help="row width of synthetic rows")
    p.add_argument("--full-queries", default="1,16",
                   help="query counts for the full-rank scan (256 needs Q x P x M memory)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-scan", action="store_true", help="no scan / query-batching section")
    p.add_argument("--skip-index", action="store_true", help="no index-agreement section")
    p.add_argument("--skip-search", action="store_true", help="no search-time section")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.n_seq, a.seq_len, a.n_layer, a.n_embd, a.train_steps, a.rounds = 64, 32, 2, 64, 20, 1
        a.search_rows, a.search_dim, a.proj_dims = "2000,20000", 64, "16,32"
    return a


def _bigram_corpus(n: int, t: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(n, t) token ids from a random chain where each token has 8 likely successors
    (the chain is fixed by seed 0; ``seed`` draws the sequences)."""
    succ = torch.randint(0, vocab, (vocab, 8), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
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


def _collate(batch: list[Batch]) -> Batch:
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


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


def _recall_within(got: torch.Tensor, ref: torch.Tensor, k_ref: int, k_got: int) -> float:
    """Mean fraction of each row's top-``k_ref`` of ``ref`` inside the top-``k_got`` of ``got``."""
    top_ref = ref.topk(min(k_ref, ref.shape[1]), dim=1).indices
    top_got = got.topk(min(k_got, got.shape[1]), dim=1).indices
    return statistics.mean(len(set(a.tolist()) & set(b.tolist())) / len(a)
                           for a, b in zip(top_ref, top_got))


_T0 = time.perf_counter()


def _phase(what: str) -> None:
    """Where the time goes, on stderr as it happens (the table comes at the end)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {what}", file=sys.stderr, flush=True)


@dataclass
class Setup:
    """The trained model, its corpus and the fitted EK-FAC every section shares."""

    args: argparse.Namespace
    device: torch.device
    model: nn.Module
    items: list[Batch]
    batches: list[Batch]
    layers: list
    curv: Curvature
    fit_s: float
    losses: tuple[float, float]

    def floor(self) -> None:
        """One plain training forward+backward over the corpus."""
        task = CausalLMTask()
        self.model.train()
        for b in self.batches:
            b = {k: v.to(self.device) for k, v in b.items()}
            self.model.zero_grad(set_to_none=True)
            task.loss(self.model, b).sum().backward()
        self.model.zero_grad(set_to_none=True)
        self.model.eval()


def _mean_loss(model: nn.Module, batches: list[Batch], device: torch.device) -> float:
    task = CausalLMTask()
    with torch.no_grad():
        total = sum(float(task.loss(model, {k: v.to(device) for k, v in b.items()}).sum())
                    for b in batches)
    return total / sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def _setup(args: argparse.Namespace) -> Setup:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.n_embd,
                     n_layer=args.n_layer, n_head=max(1, args.n_embd // 64), resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).to(device)
    ids = _bigram_corpus(args.n_seq, args.seq_len, args.vocab)
    items = [{k: v[0] for k, v in _batch(ids[i : i + 1]).items()} for i in range(args.n_seq)]
    batches = list(DataLoader(items, batch_size=args.batch_size, collate_fn=_collate))
    task = CausalLMTask()
    _phase(f"training {args.train_steps} steps")
    model.eval()
    before = _mean_loss(model, batches[:8], device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(args.train_steps):
        b = {k: v.to(device) for k, v in batches[step % len(batches)].items()}
        opt.zero_grad(set_to_none=True)
        task.loss(model, b).sum().div(b["input_ids"].numel()).backward()
        opt.step()
    model.eval()
    after = _mean_loss(model, batches[:8], device)
    layers = find_layers(model, ["*.mlp.c_fc", "*.mlp.c_proj"])
    _phase("fitting EK-FAC")
    t0 = time.perf_counter()
    curv = fit_curvature(model, task, batches, layers, FitConfig(), progress=False)
    return Setup(args, device, model, items, batches, layers, curv,
                 time.perf_counter() - t0, (before, after))


def scan_section(st: Setup) -> None:
    """The plain scan and query batching, timed side by side (the original benchmark)."""
    args, model, batches, device, curv = st.args, st.model, st.batches, st.device, st.curv
    task = CausalLMTask()
    ids = _bigram_corpus(args.n_seq, args.seq_len, args.vocab)
    # 256 queries: corpus sequences, prompt = first half, completion = second half.
    half = args.seq_len // 2
    q_ids = ids[torch.arange(256) % args.n_seq]
    q_all = [_batch(q_ids[i : i + 16], prompt=half) for i in range(0, 256, 16)]
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

    floor = st.floor

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

    _phase("timing the scans")
    floor()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(args.rounds):
        for name, fn in configs.items():
            times[name].append(_timed(fn, device))
            _phase(f"round {r + 1}: {name} {times[name][-1]:.3f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["forward+backward (floor)"]
    got_full: list[torch.Tensor] = []
    full_scan(16, got_full)()
    ref = torch.cat(got_full).t()  # (16, N)
    got_low: list[torch.Tensor] = []
    low_scan(16, got_low)()
    lowr = torch.cat(got_low).t()
    k = min(100, args.n_seq)
    print("\n| method | seconds | × forward+backward |")
    print("|---|---:|---:|")
    for name, sec in med.items():
        print(f"| {name} | {sec:.3f} | {sec / base:.2f} |")
    print(f"\nrank-{args.rank} query batching vs full EK-FAC (16 queries): Pearson r "
          f"{_pearson_rows(lowr, ref):.4f}, top-{k} overlap {top_k_overlap(lowr, ref, k):.3f}")
    shapes = {ly.name: ly.grad_shape for ly in st.layers}
    full_mib = memory_numbers(shapes, 1, None) * 4 / 2**20
    low_mib = memory_numbers(shapes, 1, args.rank) * 4 / 2**20
    print(f"query memory per query (float32): full rank {full_mib:.2f} MiB, rank "
          f"{args.rank} {low_mib:.3f} MiB ({full_mib / low_mib:.1f}x less)")


def _full_reference(st: Setup, q_batches: list[Batch]) -> torch.Tensor:
    """Full EK-FAC influence of every corpus sequence on every query, (Q, N)."""
    task = CausalLMTask()
    pre = precondition_queries(st.model, task, st.curv, q_batches, progress=False)
    got: list[torch.Tensor] = []
    scan_scores(st.model, task, pre, st.batches, lambda s, x: got.append(x.sum(-1).cpu()),
                progress=False)
    return torch.cat(got).t()


def _build_one(st: Setup, whitening: str, k: int | str, dtype: str, root: str
               ) -> GradientIndex:
    """Build an index (and, for LoGra, its projected curvature) into a fresh folder;
    ``k = "auto<bytes>"`` sizes it with :func:`auto_config` within that budget."""
    task = CausalLMTask()
    whitening, _, projection = whitening.partition("-")  # e.g. "ekfac-eigen"
    cfg = IndexConfig(k_in=16, k_out=16, dtype=dtype, whitening=whitening,
                      projection=projection or "gaussian",
                      shard_size=max(256, st.args.n_seq // 4))
    if isinstance(k, str):
        cfg, _ = auto_config(cfg, st.layers, st.curv, int(k[4:]))
    else:
        cfg = replace(cfg, k_in=k, k_out=k)
    out = tempfile.mkdtemp(dir=root)
    gi = build_index(st.model, task, st.items, st.layers, out, cfg,
                     batch_size=st.args.batch_size, collate_fn=_collate, progress=False,
                     curvature=None if whitening == "none" else st.curv)
    if whitening == "none":
        fit_projected_curvature(st.model, task, st.batches, gi, progress=False)
    return gi


def index_section(st: Setup) -> None:
    """Agreement with full EK-FAC and build cost of each whitening and width."""
    args, task = st.args, CausalLMTask()
    half = args.seq_len // 2
    q_ids = _bigram_corpus(args.queries, args.seq_len, args.vocab, seed=1)  # held out
    q_batches = [_batch(q_ids[i : i + 8], prompt=half) for i in range(0, args.queries, 8)]
    _phase("full EK-FAC reference scores")
    ref = _full_reference(st, q_batches)
    root = tempfile.mkdtemp()
    variants: list[tuple[str, int | str, str]] = [
        (w, int(k), "float16") for k in args.proj_dims.split(",")
        for w in args.whitenings.split(",")]
    variants += [(w, f"auto{b}", d) for b in args.auto_bytes.split(",") if b
                 for d in args.auto_dtypes.split(",")
                 for w in ("ekfac", "ekfac-eigen")]
    times: dict[tuple[str, int | str, str], list[float]] = {v: [] for v in variants}
    floors: list[float] = []
    built: dict[tuple[str, int | str, str], GradientIndex] = {}
    st.floor()  # warm-up
    for r in range(args.rounds):  # interleaved: floor, then every variant
        floors.append(_timed(st.floor, st.device))
        for v in variants:
            t0 = time.perf_counter()
            built[v] = _build_one(st, *v, root)
            times[v].append(time.perf_counter() - t0)
            _phase(f"round {r + 1}: build {v} {times[v][-1]:.2f} s")
    base = statistics.median(floors)
    k_top = min(100, args.n_seq)
    print(f"\nIndex vs full EK-FAC: {args.queries} held-out queries, {args.n_seq} sequences; "
          f"forward+backward {base:.2f} s (median of {args.rounds})\n")
    print("| whitening | k | storage | numbers | bytes/sequence | build × fwd+bwd | Pearson r | "
          f"top-{k_top} overlap | full top-10 in top-{k_top} |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        gi = built[v]
        q = gi.flatten(precondition_queries(st.model, task, gi.curvature, q_batches,
                                            features=gi.features))
        got = gi.scores(q.float())
        print(f"| {v[0]} | {v[1]} | {v[2]} | {gi.dim} | {gi.bytes_per_row} | "
              f"{statistics.median(times[v]) / base:.2f} | {_pearson_rows(got, ref):.4f} | "
              f"{top_k_overlap(got, ref, k_top):.3f} | {_recall_within(got, ref, 10, k_top):.3f} |")
    report = size_report(st.layers, st.curv)
    print("\n| layer | size P(M+1) | effective dim | d_eff/ε² (ε=0.25) |")
    print("|---|---:|---:|---:|")
    for name, r in report.items():
        print(f"| {name} | {r['size']} | {r['effective_dimension']:.1f} | {r['theory_dim']} |")


def _synthetic_index(path: str, n: int, dim: int, seed: int = 0) -> GradientIndex:
    """An index of ``n`` rows from a linear model on clustered inputs (structured rows)."""
    k_in = 32
    k_out = max(1, dim // k_in)
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, 64, generator=g)
    labels = torch.randint(0, 64, (n,), generator=g)
    x = centers[labels] + 0.5 * torch.randn(n, 64, generator=g)
    y = torch.randn(n, k_out, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(64, k_out)
    cfg = IndexConfig(k_in=k_in, k_out=k_out, dtype="float16", shard_size=65536)
    return build_index(model, RegressionTask(), TensorDataset(x, y), None, path, cfg,
                       batch_size=4096, progress=False)


def _search_row(args: argparse.Namespace, n: int, n_q: int, k: int) -> str:
    """One table row: exact and approximate search over ``n`` synthetic rows."""
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        _phase(f"synthetic index of {n} rows")
        gi = _synthetic_index(tmp, n, args.search_dim)
        q = gi.sample_rows(n_q) + 0.1 * torch.randn(min(n_q, n), gi.dim)
        _phase("building the ANN index")
        t_build = _timed(lambda: gi.search(q[:1], k=k, exact=False), cpu)
        exact_t, ann_t = [], []
        for _ in range(args.rounds):
            exact_t.append(_timed(lambda: gi.search(q, k=k), cpu))
            ann_t.append(_timed(lambda: gi.search(q, k=k, exact=False), cpu))
        exact_ids, _ = gi.search(q, k=k)
        ann_ids, _ = gi.search(q, k=k, exact=False)
        recall = statistics.mean(len(set(a.tolist()) & set(b.tolist())) / k
                                 for a, b in zip(exact_ids, ann_ids))
        return (f"| {n} | {statistics.median(exact_t) / len(q) * 1e3:.3f} | "
                f"{choose_method(n)} | {t_build:.1f} | "
                f"{statistics.median(ann_t) / len(q) * 1e3:.3f} | {recall:.3f} |")


def search_section(args: argparse.Namespace) -> None:
    """Search time per query, exact and approximate, over synthetic rows."""
    n_q, k = 64, 100
    print(f"\nSearch over synthetic rows ({args.search_dim} float16 numbers per row), "
          f"{n_q} queries per call, k={k}, median of {args.rounds}\n")
    print("| rows | exact ms/query | ANN method | ANN build s | ANN ms/query | ANN recall@100 |")
    print("|---:|---:|---|---:|---:|---:|")
    for n in [int(float(x)) for x in args.search_rows.split(",") if x]:
        print(_search_row(args, n, n_q, k), flush=True)


def main() -> None:
    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.skip_scan and args.skip_index:  # search only: no model needed
        search_section(args)
        return
    st = _setup(args)
    print(f"\nGPT-2 {args.n_layer}x{args.n_embd}, {args.n_seq} sequences x {args.seq_len} "
          f"tokens, {len(st.layers)} MLP layers tracked, device {st.device}, threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds (median); trained "
          f"{args.train_steps} steps (loss per token {st.losses[0]:.2f} -> {st.losses[1]:.2f}); "
          f"EK-FAC fit {st.fit_s:.1f} s")
    if not args.skip_scan:
        scan_section(st)
    if not args.skip_index:
        index_section(st)
    if not args.skip_search:
        search_section(args)


if __name__ == "__main__":
    main()
