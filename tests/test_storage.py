"""Storage: curvature round trip and refusals, the atomic writer, streamed safetensors."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from conftest import loader
from safetensors import safe_open

from datasleuth import (
    ClassificationTask,
    DatasleuthError,
    FitConfig,
    find_layers,
    fit_curvature,
    load_curvature,
    pairwise_scores,
)
from datasleuth.storage import (
    StreamedTensor,
    atomic_path,
    memmap_safetensors,
    write_bytes,
    write_json,
    write_safetensors_stream,
    write_text,
)


def test_round_trip_gives_identical_scores(mlp_data, tmp_path):
    model, x, y = mlp_data
    task = ClassificationTask()
    curv = fit_curvature(model, task, loader(x, y), None, FitConfig(blocks=2), progress=False)
    path = tmp_path / "factors.safetensors"
    curv.save(path)
    loaded = load_curvature(path, model, find_layers(model))
    assert loaded.kind == "ekfac" and loaded.metadata["config"]["blocks"] == 2
    a = pairwise_scores(model, task, curv, loader(x[:3], y[:3]), loader(x, y), progress=False)
    b = pairwise_scores(model, task, loaded, loader(x[:3], y[:3]), loader(x, y), progress=False)
    assert torch.equal(a.total, b.total)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["datasleuth"])
    assert meta["format_version"] == 1 and len(meta["fingerprint"]) == 32
    assert set(meta["layer_shapes"]) == {"0", "2"}


def test_other_model_or_config_is_refused(mlp_data, tmp_path):
    model, x, y = mlp_data
    curv = fit_curvature(model, ClassificationTask(), loader(x, y), None, progress=False)
    path = tmp_path / "f.safetensors"
    curv.save(path)
    with torch.no_grad():
        model[0].weight.add_(0.01)
    with pytest.raises(DatasleuthError, match="different model"):
        load_curvature(path, model, find_layers(model))
    with torch.no_grad():
        model[0].weight.sub_(0.01)
    with pytest.raises(DatasleuthError, match="different model"):
        load_curvature(path, model, find_layers(model, ["2"]))
    other = FitConfig(curvature="kfac").__dict__
    with pytest.raises(DatasleuthError, match="re-fit"):
        load_curvature(path, model, find_layers(model), expect={"config": other})


def test_missing_or_foreign_files_fail_clearly(tmp_path):
    with pytest.raises(DatasleuthError, match="does not exist"):
        load_curvature(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DatasleuthError, match="not a readable safetensors"):
        load_curvature(bad)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half-writ")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]


# --------------------------------------------------------------------------- one atomic writer


def test_atomic_writers_sync_file_and_directory_before_and_after_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src, dst):
        synced.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text(tmp_path / "a" / "b.txt", "héllo\n")
    assert synced == ["file", "rename", "dir"]
    assert (tmp_path / "a" / "b.txt").read_bytes() == "héllo\n".encode()
    write_json(tmp_path / "c.json", {"b": 1, "a": [2]})
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": [2], "b": 1}
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o666 & ~mask  # like plain open()


def test_atomic_writer_never_leaves_a_half_written_target_or_a_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def crash(src, dst):
        assert os.path.getsize(src) == 3  # the new content exists only under the temp name
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_bytes(target, b"new")
    monkeypatch.undo()
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


# --------------------------------------------------------------------------- streamed tensors


def test_streamed_safetensors_round_trip(tmp_path):
    ids = np.arange(24, dtype=np.int64).reshape(4, 6)
    raw = tmp_path / "ids.bin"
    raw.write_bytes(ids.astype("<i4").tobytes())  # raw little-endian bytes on disk
    floats = np.linspace(-1, 1, 10, dtype=np.float64).reshape(2, 5)
    path = tmp_path / "t.safetensors"
    write_safetensors_stream(path, [
        StreamedTensor("ids", "I32", (4, 6), raw),
        ("lengths", "I64", (4,), np.array([6, 6, 6, 2])),
        ("w", "F32", (2, 5), floats),
        ("flags", "BOOL", (3,), np.array([True, False, True])),
        ("empty", "F16", (0, 3), np.zeros((0, 3))),
    ], {"format": "test", "n": "4"})
    want = {"ids": ids.astype(np.int32), "lengths": np.array([6, 6, 6, 2]),
            "w": floats.astype(np.float32), "flags": np.array([True, False, True]),
            "empty": np.zeros((0, 3), np.float16)}
    with safe_open(str(path), framework="np") as f:  # safetensors' own reader
        assert f.metadata() == {"format": "test", "n": "4"}
        theirs = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    ours = memmap_safetensors(path)
    for got in (theirs, ours):
        assert set(got) == set(want)
        for name, value in want.items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    assert isinstance(ours["ids"], np.memmap) and not ours["ids"].flags.writeable
    assert sorted(os.listdir(tmp_path)) == ["ids.bin", "t.safetensors"]


def test_streamed_safetensors_refuses_bad_input_and_damaged_files(tmp_path):
    path = tmp_path / "t.safetensors"
    raw = tmp_path / "short.bin"
    raw.write_bytes(b"\0" * 12)
    with pytest.raises(ValueError, match="holds 12 bytes"):
        write_safetensors_stream(path, [("x", "I32", (2, 2), raw)])
    with pytest.raises(ValueError, match="has 3 values"):
        write_safetensors_stream(path, [("x", "I32", (2, 2), np.zeros(3))])
    with pytest.raises(ValueError, match="dtype 'BF16'"):
        write_safetensors_stream(path, [("x", "BF16", (1,), np.zeros(1))])
    assert sorted(os.listdir(tmp_path)) == ["short.bin"]  # nothing half-written
    write_safetensors_stream(path, [("x", "I64", (100,), np.arange(100))])
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasleuthError, match="is damaged .*; rebuild it"):
        memmap_safetensors(path, "rebuild it")
    with pytest.raises(DatasleuthError, match="is damaged"):
        memmap_safetensors(tmp_path / "missing.safetensors")


def test_stored_factors_with_nan_are_refused_naming_the_layer(mlp_data, tmp_path):
    from safetensors.torch import load_file, save_file

    model, x, y = mlp_data
    curv = fit_curvature(model, ClassificationTask(), loader(x, y), None, progress=False)
    path = tmp_path / "f.safetensors"
    curv.save(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["2/eigenvalues"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(DatasleuthError, match=r"layer 2: the stored eigenvalues holds NaN in .*"
                                              r"re-run `datasleuth fit`"):
        load_curvature(path, model, find_layers(model))


def test_round_trip_keeps_the_model_order_of_layers(tmp_path):
    """Layer 10 after layer 2, as fitted, not as the file's sorted JSON header has it: the
    per-layer axis of scores (and the report) is the same before and after a reload."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(3, 3), nn.Tanh())],
                          nn.Linear(3, 2)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    task = ClassificationTask()
    curv = fit_curvature(model, task, loader(x, y), None, FitConfig(), progress=False)
    assert curv.layer_names == ["0", "2", "4", "6", "8", "10", "12"]
    curv.save(tmp_path / "f.safetensors")
    loaded = load_curvature(tmp_path / "f.safetensors", model, find_layers(model))
    assert loaded.layer_names == curv.layer_names and "layer_order" not in loaded.metadata
    a = pairwise_scores(model, task, curv, loader(x[:2], y[:2]), loader(x, y), progress=False)
    b = pairwise_scores(model, task, loaded, loader(x[:2], y[:2]), loader(x, y),
                        progress=False)
    assert a.layer_names == b.layer_names and torch.equal(a.per_layer, b.per_layer)
