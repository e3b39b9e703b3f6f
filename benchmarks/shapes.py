"""Fit and scan at real layer shapes, with Kronfluence side by side when it is installed.

Models built from configs with random weights (no download), one or two decoder
blocks, a reduced vocabulary (8192) so that the output layer does not dominate:

* ``gpt2``: GPT-2 small's blocks (768 wide, 3072-wide MLP), MLP layers tracked;
* ``llama``: Llama-3.2-1B's blocks (2048 wide, 8192-wide MLP, 32/8 heads), MLP tracked;
* ``moe``: a small Mixtral (1024 wide, 8 experts of 1024, top 2), attention projections
  tracked (what Kronfluence can track: the fused expert weights are not ``nn.Linear``);
* ``moe-experts``: the same model with every expert tracked on its own (datasleuth only).

Per step, the time as a ratio to one plain training forward+backward over the same
batches (``loss.backward()`` into every weight; the floor is timed in every round and
the median taken) and the step's peak memory (CUDA: allocator peak; CPU: resident set,
sampled): EK-FAC fit (its eigendecompositions also in seconds: a one-off O(n³) cost
that does not grow with the corpus), scan against 1 query, 256 full-rank queries
(preconditioning in seconds) and 256 rank-32 queries (compressing in seconds).

    pip install --no-deps kronfluence==1.0.1 einconv && pip install accelerate einops opt-einsum
    python benchmarks/shapes.py --models gpt2,moe,moe-experts # 2 CPU threads, minutes
    python benchmarks/shapes.py --device cuda --models gpt2,llama,moe --seq-len 512 --n-seq 64
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import datasleuth.fitting as fitting  # noqa: E402
from datasleuth import FitConfig, find_layers, fit_curvature  # noqa: E402
from datasleuth.lm.task import CausalLMTask  # noqa: E402
from datasleuth.scale.batching import compress_queries, scan_low_rank  # noqa: E402
from datasleuth.scoring import precondition_queries, scan_scores  # noqa: E402

Batch = dict[str, torch.Tensor]
VOCAB = 8192


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,moe")
    p.add_argument("--n-layer", type=int, default=1)
    p.add_argument("--n-seq", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--full-queries", type=int, default=None,
                   help="full-rank query count (default --queries; Q P M numbers each layer)")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eigh-precision", default="device",
                   choices=["device", "auto", "float64", "float32"],
                   help="FitConfig.eigh_precision (device: float64 on a CPU)")
    p.add_argument("--no-kronfluence", action="store_true")
    p.add_argument("--kronfluence-queries", type=int, default=None,
                   help="queries of Kronfluence's scans (default: as datasleuth's)")
    return p.parse_args()


def _model(name: str, n_layer: int, seq_len: int) -> tuple[torch.nn.Module, list[str]]:
    """A randomly initialised model and the glob patterns of its tracked layers."""
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "num_hidden_layers": n_layer, "bos_token_id": None,
              "eos_token_id": None, "pad_token_id": None, "max_position_embeddings": seq_len}
    if name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=seq_len, n_embd=768, n_layer=n_layer,
                            n_head=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=None, eos_token_id=None)
        return _linear_gpt2(tf.GPT2LMHeadModel(cfg)), ["*.mlp.c_fc", "*.mlp.c_proj"]
    if name == "llama":
        cfg = tf.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                             num_key_value_heads=8, **common)
        return tf.LlamaForCausalLM(cfg), ["*.mlp.*_proj"]
    if name in ("moe", "moe-experts"):
        cfg = tf.MixtralConfig(hidden_size=1024, intermediate_size=1024, num_attention_heads=16,
                               num_key_value_heads=4, num_local_experts=8,
                               num_experts_per_tok=2, **common)
        tracked = ["*.experts.*"] if name == "moe-experts" else ["*.self_attn.*_proj"]
        return tf.MixtralForCausalLM(cfg), tracked
    raise SystemExit(f"unknown model {name!r}; choose gpt2, llama, moe or moe-experts")


def _drop(first: int, scores: torch.Tensor) -> None:
    """Scores are computed and dropped: the scan's own cost is measured."""


def _linear_gpt2(model: torch.nn.Module) -> torch.nn.Module:
    """GPT-2's Conv1D layers as equal ``nn.Linear`` ones (Kronfluence tracks only those)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv1D":
                m, p = child.weight.shape
                lin = torch.nn.Linear(m, p)
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    lin.bias.copy_(child.bias)
                setattr(parent, child_name, lin)
    return model


def _batch(ids: torch.Tensor, prompt: int = 0) -> Batch:
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class _Peak:
    """Peak memory of a step: CUDA allocator peak, or the sampled CPU resident set."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> _Peak:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.peak = self._rss()

        def sample() -> None:
            while not self._stop.wait(0.01):
                self.peak = max(self.peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())


def _run(fn: Callable[[], object], device: torch.device) -> tuple[float, int, object]:
    """(seconds, peak bytes, result) of one call."""
    with _Peak(device) as peak:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    return seconds, peak.peak, out


class _Kronfluence:
    """The same steps with Kronfluence 1.0.1 (EK-FAC, same batches and layers)."""

    def __init__(self, model: torch.nn.Module, modules: list[str], workdir: str,
                 device: torch.device):
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.task import Task

        class LM(Task):
            def compute_train_loss(self, batch, model, sample=False):
                logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                if sample:
                    with torch.no_grad():
                        probs = F.softmax(logits.detach(), -1)
                        labels = torch.multinomial(probs.flatten(0, 1), 1).view(labels.shape)
                return F.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                       ignore_index=-100, reduction="sum")

            def compute_measurement(self, batch, model):
                return -self.compute_train_loss(batch, model)

            def get_influence_tracked_modules(self):
                return modules

        self.analyzer = Analyzer("shapes", prepare_model(model, LM()), LM(),
                                 cpu=device.type == "cpu", disable_tqdm=True,
                                 output_dir=workdir, log_level=logging.ERROR)

    def fit(self, train: list[Batch], batch_size: int) -> None:
        from kronfluence.arguments import FactorArguments

        self.analyzer.fit_all_factors("f", dataset=train, per_device_batch_size=batch_size,
                                      factor_args=FactorArguments(strategy="ekfac"),
                                      overwrite_output_dir=True)

    def scores(self, queries: list[Batch], train: list[Batch], batch_size: int,
               rank: int | None) -> None:
        from kronfluence.arguments import ScoreArguments

        args = ScoreArguments(query_gradient_low_rank=rank)
        self.analyzer.compute_pairwise_scores(
            "s", factors_name="f", query_dataset=queries, train_dataset=train,
            per_device_query_batch_size=min(len(queries), 16),
            per_device_train_batch_size=batch_size, score_args=args,
            overwrite_output_dir=True)


def _data(args: argparse.Namespace) -> tuple[list[Batch], list[Batch], list[Batch], int]:
    """Random training batches, the queries (second half of corpus sequences) in batches
    of 16, the full-rank queries' batches, and their count."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.n_seq, args.seq_len), generator=g)
    batches = [_batch(ids[i:i + args.batch_size]) for i in range(0, args.n_seq,
                                                                   args.batch_size)]
    q_ids = ids[torch.arange(args.queries) % args.n_seq]
    q_batches = [_batch(q_ids[i:i + 16], args.seq_len // 2)
                 for i in range(0, args.queries, 16)]
    n_full = args.full_queries if args.full_queries is not None else args.queries
    full_batches = q_batches[: max(1, n_full // 16)]
    if n_full < 16:
        full_batches = [{k: v[:n_full] for k, v in q_batches[0].items()}]
    return batches, q_batches, full_batches, n_full


def _bench(name: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    model, patterns = _model(name, args.n_layer, args.seq_len)
    model = model.to(device).eval()
    layers = find_layers(model, patterns)
    task = CausalLMTask()
    batches, q_batches, full_batches, n_full = _data(args)

    def floor() -> None:
        model.train()
        for b in batches:
            model.zero_grad(set_to_none=True)
            task.loss(model, {k: v.to(device) for k, v in b.items()}).sum().backward()
        model.zero_grad(set_to_none=True)
        model.eval()

    eigh_seconds = []  # the eigendecompositions and the bases built from them
    inner = fitting._eigenbases

    def timed_eigh(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        eigh_seconds.append(time.perf_counter() - t0)
        return out

    fitting._eigenbases = timed_eigh
    floor()  # warm-up: the first pass pays one-off allocation and kernel set-up costs
    rows: dict[str, list[tuple[float, int]]] = {}
    extra: dict[str, float] = {}
    floors = []
    curv = None
    for _ in range(args.rounds):
        floors.append(_run(floor, device)[:2])
        s, m, curv = _run(lambda: fit_curvature(model, task, batches, layers,
                                                FitConfig(eigh_precision=args.eigh_precision),
                                                progress=False), device)
        rows.setdefault("datasleuth: fit EK-FAC", []).append((s, m))
        extra["eigh"] = eigh_seconds[-1]
        one = precondition_queries(model, task, curv, [{k: v[:1] for k, v in
                                                        q_batches[0].items()}])
        s, m, _ = _run(lambda one=one: scan_scores(model, task, one, batches, _drop,
                                                   progress=False), device)
        rows.setdefault("datasleuth: scan, 1 query", []).append((s, m))
        del one
        s, m, full = _run(lambda c=curv: precondition_queries(model, task, c, full_batches),
                          device)
        extra["precondition"] = s
        s, m, _ = _run(lambda full=full: scan_scores(model, task, full, batches, _drop,
                                                     progress=False), device)
        rows.setdefault(f"datasleuth: scan, {n_full} full-rank queries", []).append((s, m))
        del full
        s, m, low = _run(lambda c=curv: compress_queries(model, task, c, q_batches, args.rank),
                         device)
        extra["compress"] = s
        s, m, _ = _run(lambda low=low: scan_low_rank(model, task, low, batches, _drop,
                                                     progress=False), device)
        rows.setdefault(f"datasleuth: scan, {args.queries} rank-{args.rank} queries",
                        []).append((s, m))
        del low
    fitting._eigenbases = inner
    base = statistics.median(s for s, _ in floors)
    out = _table(name, model, layers, args, device, base, floors, rows, extra, n_full)
    if not args.no_kronfluence and name != "moe-experts":
        out += _kronfluence_rows(model, layers, batches, q_batches, args, device, base)
    return out


def _table(name: str, model: torch.nn.Module, layers: list, args: argparse.Namespace,
           device: torch.device, base: float, floors: list, rows: dict, extra: dict,
           n_full: int) -> list[str]:
    """The Markdown lines of one model's datasleuth steps."""
    out = [f"**{name}**: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
           f"{args.n_layer} block(s), tracked {len(layers)} layers "
           f"({', '.join(sorted({f'{x.out_features}x{x.in_features}' for x in layers}))}), "
           f"{args.n_seq} x {args.seq_len} tokens, batch {args.batch_size}, {device}, "
           f"{torch.get_num_threads()} threads; eigendecompositions ({args.eigh_precision}) "
           f"{extra['eigh']:.2f} s, "
           f"preconditioning {n_full} queries {extra['precondition']:.2f} s, compressing "
           f"{args.queries} to rank {args.rank} {extra['compress']:.2f} s",
           "", "| step | seconds | × fwd+bwd | peak memory (GiB) |", "|---|---:|---:|---:|",
           f"| forward+backward (floor) | {base:.2f} | 1.00 | "
           f"{max(m for _, m in floors) / 2**30:.2f} |"]
    for label, vals in rows.items():
        s = statistics.median(v for v, _ in vals)
        m = max(v for _, v in vals)
        out.append(f"| {label} | {s:.2f} | {s / base:.2f} | {m / 2**30:.2f} |")
        if label.endswith("fit EK-FAC"):
            out.append(f"| datasleuth: fit EK-FAC without eigendecompositions | "
                       f"{s - extra['eigh']:.2f} | {(s - extra['eigh']) / base:.2f} | |")
    return out


def _kronfluence_rows(model, layers, batches, q_batches, args, device, base) -> list[str]:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return ["| Kronfluence | not installed | | |"]
    import copy

    n_low = args.kronfluence_queries or args.queries
    n_full = min(n_low, args.full_queries if args.full_queries is not None else args.queries)
    train = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]
    queries = [{k: v[i] for k, v in b.items()} for b in q_batches
               for i in range(len(b["labels"]))]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        kf = _Kronfluence(copy.deepcopy(model), [x.name for x in layers], tmp, device)
        steps = [("fit EK-FAC", lambda: kf.fit(train, args.batch_size)),
                 ("scan, 1 query", lambda: kf.scores(queries[:1], train, args.batch_size, None)),
                 (f"scan, {n_full} full-rank queries",
                  lambda: kf.scores(queries[:n_full], train, args.batch_size, None)),
                 (f"scan, {n_low} rank-{args.rank} queries",
                  lambda: kf.scores(queries[:n_low], train, args.batch_size, args.rank))]
        for label, fn in steps:
            s, m, _ = _run(fn, device)
            out.append(f"| Kronfluence: {label} | {s:.2f} | {s / base:.2f} | {m / 2**30:.2f} |")
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    args = _args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}")
    for name in args.models.split(","):
        print("\n".join(_bench(name, args, device)), "\n", flush=True)


if __name__ == "__main__":
    main()
