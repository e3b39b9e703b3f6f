"""Process count must not change the answer: 2 gloo processes equal one process.

Each worker fits curvature on its shard of the data and scans its block of a packed
corpus; the fitted factors and the merged top-k, histogram samples and counts must
equal a single-process run in float64.
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
from torch.utils.data import DataLoader, Subset, TensorDataset

from datasleuth import FitConfig, fit_curvature, load_curvature
from datasleuth.demo import build_tokenizer
from datasleuth.distributed import shard
from datasleuth.lm.corpus import PackedCorpus, pack_corpus
from datasleuth.lm.task import CausalLMTask
from datasleuth.lm.trace import TraceConfig, scan_corpus
from datasleuth.scoring import precondition_queries
from datasleuth.storage import save_curvature
from datasleuth.task import ClassificationTask

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "in", "parks", "and",
         "birds", "sang", "songs", "at", "dawn"]
TRACE = TraceConfig(top_k=5, bottom_k=3, batch_size=3, histogram_sample=7)


def _mlp_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(23, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    return model, TensorDataset(x, y)


def _lm(root: Path):
    tok = build_tokenizer([" ".join(WORDS)] * 4, vocab_size=300)
    model = tiny_gpt2(vocab=len(tok))
    return model, tok


def _scan(model, corpus, query):
    pre = precondition_queries(model, CausalLMTask(), _curv_lm(model, corpus), [query],
                               progress=False)
    return scan_corpus(model, pre, corpus, TRACE, progress=False)


def _curv_lm(model, corpus):
    loader = DataLoader(list(shard(len(corpus))), batch_size=4, collate_fn=corpus.collate)
    return fit_curvature(model, CausalLMTask(), loader, ["*.mlp.*"],
                         FitConfig(fisher="empirical"), progress=False)


def _query(tok):
    ids = tok(" the cat sat on a mat", add_special_tokens=False)["input_ids"]
    t = torch.tensor([ids])
    labels = t.clone()
    labels[:, :3] = -100
    return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": labels}


def _worker(rank: int, size: int, root: str) -> None:
    root_path = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=size)
    try:
        torch.set_num_threads(1)
        model, data = _mlp_data()
        part = Subset(data, list(shard(len(data))))
        for kind in ("ekfac", "kfac"):
            curv = fit_curvature(model, ClassificationTask(), DataLoader(part, batch_size=4),
                                 None, FitConfig(curvature=kind, fisher="empirical"),
                                 progress=False)
            save_curvature(curv, root_path / f"{kind}-rank{rank}.safetensors")
        lm, tok = _lm(root_path)
        corpus = PackedCorpus.load(root_path / "corpus")
        scan = _scan(lm, corpus, _query(tok))
        out = {"top": scan.top.results(0), "bottom": scan.bottom.results(0),
               "samples": scan.samples, "scanned": scan.scanned}
        (root_path / f"scan-rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    model, data = _mlp_data()
    lm, tok = _lm(tmp_path)
    docs = tmp_path / "docs.jsonl"
    g = torch.Generator().manual_seed(1)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(3, 30, (25,), generator=g)]
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    corpus = pack_corpus(docs, tok, seq_len=12, output_dir=tmp_path / "corpus", progress=False)
    assert len(corpus) > 20

    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    for kind in ("ekfac", "kfac"):
        want = fit_curvature(model, ClassificationTask(), DataLoader(data, batch_size=5), None,
                             FitConfig(curvature=kind, fisher="empirical"), progress=False)
        for rank in (0, 1):
            got = load_curvature(tmp_path / f"{kind}-rank{rank}.safetensors")
            assert got.metadata["sequences"] == 23
            for name, layer in want.layers.items():
                torch.testing.assert_close(got.layers[name].dense(), layer.dense(),
                                           rtol=1e-9, atol=1e-12)
    single = _scan(lm, corpus, _query(tok))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"scan-rank{rank}.json").read_text())
        assert got["scanned"] == single.scanned == [len(corpus)]
        for which, running in (("top", single.top), ("bottom", single.bottom)):
            rows = running.results(0)
            assert [r[0] for r in got[which]] == [r[0] for r in rows]
            for (_, s, layers), (_, s1, layers1) in zip(got[which], rows):
                assert s == pytest.approx(s1, rel=1e-9, abs=1e-12)
                assert layers == pytest.approx(layers1, rel=1e-9, abs=1e-12)
        assert got["samples"][0] == pytest.approx(single.samples[0], rel=1e-9, abs=1e-12)
