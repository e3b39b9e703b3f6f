"""Many full-rank queries for about the price of one: the scan's batch size.

The full-rank scan reads every query's preconditioned gradient (Q × P × (M+1) numbers
per layer) once per training batch; larger batches spread that over more sequences.
On a random GPT-2 (4 blocks, width 256, MLP layers tracked) and 256 sequences × 128
tokens, prints for each batch size the time of one plain training forward+backward
pass and of the scan against 256 queries, side by side in one run.

    python benchmarks/scan_batch.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("DATASLEUTH_PROGRESS", "0")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from datasleuth import FitConfig, find_layers, fit_curvature, precondition_queries  # noqa: E402
from datasleuth.lm.task import CausalLMTask  # noqa: E402
from datasleuth.scoring import scan_scores  # noqa: E402


def _batch(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def main() -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=2048, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                     eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 2048, (256, 128))
    task = CausalLMTask()
    layers = find_layers(model, ["*.mlp.c_fc", "*.mlp.c_proj"])
    curv = fit_curvature(model, task, [_batch(ids[i : i + 32]) for i in range(0, 64, 32)],
                         layers, FitConfig(), progress=False)
    pre = precondition_queries(model, task, curv,
                               [_batch(ids[i : i + 16]) for i in range(0, 256, 16)],
                               progress=False)
    mib = sum(v.numel() for v in pre.values()) * 4 / 2**20
    print(f"256 queries, {mib:.0f} MiB of preconditioned gradients; torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| batch size | forward+backward (s) | scan, 256 queries (s) | ratio |")
    print("|---:|---:|---:|---:|")
    for bs in (8, 32, 64):
        batches = [_batch(ids[i : i + bs]) for i in range(0, 256, bs)]

        t0 = time.perf_counter()
        model.train()
        for b in batches:
            model.zero_grad(set_to_none=True)
            task.loss(model, b).sum().backward()
        model.eval()
        f = time.perf_counter() - t0
        t0 = time.perf_counter()
        scan_scores(model, task, pre, batches, lambda start, s: None, progress=False)
        s = time.perf_counter() - t0
        print(f"| {bs} | {f:.2f} | {s:.2f} | {s / f:.2f} |", flush=True)


if __name__ == "__main__":
    main()
