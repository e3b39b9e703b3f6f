"""A model sharded with FSDP2 over 2 gloo processes equals one unsharded process.

Each worker shards a tiny float64 GPT-2 with :func:`datasleuth.fsdp.shard_model`, fits
EK-FAC on its shard of a packed corpus (the shards have different numbers of batches,
so :func:`datasleuth.fsdp.lockstep` must replay), traces a query (scan, token scores,
per-head scores), ranks self-influence and builds a projected-gradient index; rank 0's
results must equal one process doing the same with the plain model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_gpt2
from torch.utils.data import DataLoader

from datasleuth import FitConfig, find_layers, fit_curvature, load_curvature
from datasleuth.demo import build_tokenizer
from datasleuth.distributed import shard
from datasleuth.errors import DatasleuthError
from datasleuth.fsdp import is_sharded, shard_model
from datasleuth.lm.corpus import PackedCorpus, pack_corpus
from datasleuth.lm.pipeline import build_corpus_index
from datasleuth.lm.self_influence import run_self_influence
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import TraceConfig, scan_corpus, trace_details
from datasleuth.scale.index import GradientIndex, IndexConfig
from datasleuth.scoring import precondition_queries
from datasleuth.storage import save_curvature

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "in", "parks"]
TRACE = TraceConfig(top_k=4, bottom_k=2, batch_size=2, histogram_sample=5)
LAYERS = ["*.mlp.*", "*.attn.c_attn"]


def _run_all(model, tok, corpus: PackedCorpus, out: Path, rank: int) -> None:
    """Fit, trace and self-influence; rank 0 writes what the test compares."""
    loader = DataLoader(list(shard(len(corpus))), batch_size=2, collate_fn=corpus.collate)
    curv = fit_curvature(model, CausalLMTask(), loader, LAYERS, FitConfig(fisher="empirical"),
                         progress=False)
    ids = tok(" the cat sat on a mat", add_special_tokens=False)["input_ids"]
    t = torch.tensor([ids])
    labels = t.clone()
    labels[:, :3] = -100
    query = {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": labels}
    pre = precondition_queries(model, CausalLMTask(), curv, [query], progress=False)
    scan = scan_corpus(model, pre, corpus, TRACE, progress=False)
    doc = trace_details(model, pre, corpus, scan,
                        [{"id": "q", "prompt": " the cat sat", "completion": " on a mat"}],
                        TRACE, {})
    si = run_self_influence(model, corpus, curv, out, top_k=5, batch_size=2, progress=False)
    index = build_corpus_index(model, find_layers(model, ["*.mlp.*"]), corpus, out / "index",
                               IndexConfig(k_in=4, k_out=4, dtype="float64", shard_size=8),
                               batch_size=2, fisher="empirical", progress=False)
    assert index.rows == len(corpus)
    if rank == 0:
        save_curvature(curv, out / "curv.safetensors")
        (out / "trace.json").write_text(json.dumps({"queries": doc["queries"], "si": si}))


def _worker(rank: int, size: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=size)
    try:
        torch.set_num_threads(1)
        tok = build_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)
        model = shard_model(tiny_gpt2(vocab=len(tok)))
        assert is_sharded(model)
        corpus = PackedCorpus.load(Path(root) / "corpus")
        _run_all(model, tok, corpus, Path(root) / f"fsdp-{rank}", rank)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-8, abs=1e-12), path
    elif path.split(".")[-1] != "created":
        assert a == b, path


def test_fsdp_two_processes_equal_one(tmp_path):
    tok = build_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)
    g = torch.Generator().manual_seed(2)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(3, 25, (16,), generator=g)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    corpus = pack_corpus(tmp_path / "docs.jsonl", tok, seq_len=12,
                         output_dir=tmp_path / "corpus", progress=False)
    halves = [len(shard(len(corpus), r, 2)) for r in (0, 1)]
    assert -(-halves[0] // 2) != -(-halves[1] // 2), "shards must differ in batch count"

    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    _run_all(tiny_gpt2(vocab=len(tok)), tok, corpus, tmp_path / "single", rank=0)

    want = load_curvature(tmp_path / "single" / "curv.safetensors")
    got = load_curvature(tmp_path / "fsdp-0" / "curv.safetensors")
    assert got.metadata["sequences"] == want.metadata["sequences"] == len(corpus)
    assert got.metadata["fingerprint"] == want.metadata["fingerprint"]
    for name, layer in want.layers.items():
        torch.testing.assert_close(got.layers[name].dense(), layer.dense(), rtol=1e-9,
                                   atol=1e-12)
    single = json.loads((tmp_path / "single" / "trace.json").read_text())
    sharded = json.loads((tmp_path / "fsdp-0" / "trace.json").read_text())
    assert single["queries"][0]["top"][0]["head_scores"]  # per-head rows were compared too
    _close(sharded, single)
    got_index = GradientIndex.open(tmp_path / "fsdp-0" / "index")
    want_index = GradientIndex.open(tmp_path / "single" / "index")
    assert len(got_index.shards) == len(want_index.shards) > 1
    torch.testing.assert_close(got_index.load_rows(), want_index.load_rows(), rtol=1e-9,
                               atol=1e-12)
    for name, ggn in want_index.curvature.ggn.items():
        torch.testing.assert_close(got_index.curvature.ggn[name], ggn, rtol=1e-9, atol=1e-12)
    assert not (tmp_path / "fsdp-1" / "index").exists()  # rank 0 alone writes


def test_shard_model_needs_processes():
    with pytest.raises(DatasleuthError, match="torchrun"):
        shard_model(tiny_gpt2())


def _expert_worker(rank: int, size: int, root: str) -> None:
    from test_moe import _batches, _mixtral

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous-experts", rank=rank,
                            world_size=size)
    try:
        torch.set_num_threads(1)
        model = shard_model(_mixtral())
        curv = fit_curvature(model, CausalLMTask(), _batches()[rank::size], ["*.experts.*"],
                             FitConfig(fisher="empirical"), progress=False)
        if rank == 0:
            save_curvature(curv, Path(root) / "experts.safetensors")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_fsdp_expert_layers_two_processes_equal_one(tmp_path):
    """Fused 3-D expert weights sharded by FSDP2: each expert's factors as one process."""
    from test_moe import _batches, _mixtral

    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_expert_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    want = fit_curvature(_mixtral(), CausalLMTask(), _batches(), ["*.experts.*"],
                         FitConfig(fisher="empirical"), progress=False)
    got = load_curvature(tmp_path / "experts.safetensors")
    assert sorted(got.layer_names) == sorted(want.layer_names) and len(want.layer_names) == 16
    for name, layer in want.layers.items():
        torch.testing.assert_close(got.layers[name].dense(), layer.dense(), rtol=1e-9,
                                   atol=1e-12)
