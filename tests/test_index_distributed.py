"""An index built by two gloo processes equals one built by one process (bitwise)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import lm_batch, tiny_gpt2
from safetensors.torch import load_file

from datasleuth.lm.task import CausalLMTask
from datasleuth.scale.index import GradientIndex, IndexConfig, build_index
from datasleuth.storage import read_json

CFG = IndexConfig(k_in=3, k_out=4, dtype="float64", shard_size=3)


def _seqs(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 13, (int(t),), generator=g).tolist()
            for t in torch.randint(3, 9, (n,), generator=g)]


def _build(path, seqs, append=False):
    return build_index(tiny_gpt2(vocab=13), CausalLMTask(), seqs, ["*.mlp.*"], path, CFG,
                       batch_size=2, collate_fn=lm_batch, append=append, progress=False)


def _worker(rank: int, size: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=size)
    try:
        torch.set_num_threads(1)
        _build(f"{root}/two", _seqs(11, 0))
        _build(f"{root}/two", _seqs(4, 1), append=True)  # 4 shards, then 2 more
    finally:
        dist.destroy_process_group()


def test_two_processes_build_the_index_one_process_builds(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    _build(tmp_path / "one", _seqs(11, 0))
    one = _build(tmp_path / "one", _seqs(4, 1), append=True)
    two = GradientIndex.open(tmp_path / "two")
    assert read_json(tmp_path / "two" / "manifest.json") == read_json(
        tmp_path / "one" / "manifest.json")
    assert two.rows == 15 and len(two.shards) == 6 and two.complete
    for shard in one.shards:
        a, b = (load_file(str(p / shard["file"]))["rows"] for p in (tmp_path / "one",
                                                                     tmp_path / "two"))
        assert torch.equal(a, b)
    assert not list((tmp_path / "two").glob("manifest.rank*"))
