"""Engine cost relative to one plain training forward+backward pass over the same data.

Measured side by side in one run on a small GPT-2 (transformers, Conv1D layers, MLP
layers tracked) and a random-token corpus: the floor is one ``loss.backward()`` pass
computing every weight gradient; each method's time is printed as a ratio to it.

    python benchmarks/engine.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/engine.py --quick
    python benchmarks/engine.py --threads 1 --cpu-time   # on a shared, loaded machine
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")

from datasleuth import FitConfig, find_layers, fit_curvature, pairwise_scores  # noqa: E402
from datasleuth.lm.task import CausalLMTask  # noqa: E402


def build(n_seq: int, seq_len: int, n_layer: int, n_embd: int, vocab: int = 2048):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer,
                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, vocab, (n_seq, seq_len), generator=torch.Generator().manual_seed(1))
    batches = []
    for i in range(0, n_seq, 8):
        x = ids[i : i + 8]
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x})
    return model, batches


CLOCK = time.perf_counter


def timed(fn) -> float:
    start = CLOCK()
    fn()
    return CLOCK() - start


def floor_pass(model, batches) -> None:
    task = CausalLMTask()
    for b in batches:
        model.zero_grad(set_to_none=True)
        task.loss(model, b).sum().backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by this process's CPU seconds (robust on a loaded machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    n_seq, seq_len, n_layer, n_embd = (64, 64, 2, 128) if args.quick else (256, 128, 4, 256)
    model, batches = build(n_seq, seq_len, n_layer, n_embd)
    layers = find_layers(model, ["*.mlp.*"])
    task = CausalLMTask()
    queries = {q: [{k: v[i % 8:i % 8 + 1] for k, v in batches[i // 8].items()}
                   for i in range(q)] for q in (1, 16)}
    queries[16] = [{k: torch.cat([b[k] for b in queries[16]]) for k in batches[0]}]
    floor_pass(model, batches[:1])  # warm-up
    floor = min(timed(lambda: floor_pass(model, batches)) for _ in range(2))
    rows = [("plain training forward+backward (floor)", floor)]
    curv = {}
    for kind in ("diagonal", "kfac", "ekfac"):
        t = timed(lambda k=kind: curv.__setitem__(
            k, fit_curvature(model, task, batches, layers, FitConfig(curvature=k),
                             progress=False)))
        rows.append((f"fit {kind}", t))
    for q in (1, 16):
        t = timed(lambda q=q: pairwise_scores(model, task, curv["ekfac"], queries[q], batches,
                                              progress=False))
        rows.append((f"score corpus vs {q} quer{'y' if q == 1 else 'ies'} (EK-FAC)", t))
    tracked = sum(ly.grad_shape[0] * ly.grad_shape[1] for ly in layers)
    print(f"GPT-2 n_layer={n_layer} n_embd={n_embd}, {n_seq} sequences x {seq_len} tokens, "
          f"{len(layers)} MLP layers tracked ({tracked / 1e6:.2f}M parameters), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print()
    print("| step | seconds | sequences/s | ratio to fwd+bwd |")
    print("|---|---:|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {n_seq / t:.1f} | {t / floor:.2f} |")


if __name__ == "__main__":
    main()
