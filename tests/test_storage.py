"""Fitted curvature on disk: round trip, refusal of mismatches, atomic writes."""

from __future__ import annotations

import json
import os

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
from datasleuth.storage import atomic_path


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
