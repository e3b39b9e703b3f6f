"""Outputs committed together, orphans cleaned, one run per folder, the fit's snapshot kept
until its factors are safely written (datasleuth.folders)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_inputs import lm, visible, world  # noqa: F401 -- the module's tiny inputs

import datasleuth
import datasleuth.folders as folders
from datasleuth.cli import main
from datasleuth.errors import DatasleuthError

OUTPUTS = {"trace": ["report.html", "results.json", "results.parquet"],
           "self-influence": ["self_influence.json", "self_influence.parquet"]}
WRITER = {"trace": "datasleuth.lm.pipeline.write_json",
          "self-influence": "datasleuth.lm.self_influence.write_json"}


def _snapshot(out: Path, command: str) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS[command]}


def _killed(*args, **kwargs):
    raise KeyboardInterrupt  # a kill between the table and the summary


@pytest.mark.parametrize("command", ["trace", "self-influence"])
def test_a_kill_between_two_output_writes_leaves_the_previous_pair(world, tmp_path, capsys,  # noqa: F811
                                                                   monkeypatch, command):
    out = tmp_path / "out"
    assert main(lm(command, world, tmp_path, "--top-k", "3", work=world["work"])) == 0
    before = _snapshot(out, command)
    with monkeypatch.context() as m:
        m.setattr(WRITER[command], _killed)
        m.setattr(folders.OutputSet, "discard", lambda self: None)  # SIGKILL: no clean-up
        assert main(lm(command, world, tmp_path, "--top-k", "2", work=world["work"])) == 130
    assert _snapshot(out, command) == before  # the previous run's files, all of them
    assert list(out.glob(".pending-*"))  # the killed run's half-written set ...
    capsys.readouterr()
    assert main(lm(command, world, tmp_path, "--top-k", "2", work=world["work"])) == 0
    assert not list(out.glob(".pending-*"))  # ... is cleaned up by the next run
    after = _snapshot(out, command)
    assert all(after[name] != before[name] for name in OUTPUTS[command] if "json" in name)
    assert visible(out) == sorted(OUTPUTS[command] + ["config.resolved.json"])


def test_a_kill_after_the_commit_point_is_finished_by_the_next_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "a.txt").write_text("old a")
    (out / "b.txt").write_text("old b")
    files = folders.OutputSet(out)
    files.path("a.txt").write_text("new a")
    files.path("b.txt").write_text("new b")
    moved = []

    def replace_once(src, dst):
        if moved:
            raise KeyboardInterrupt  # killed after moving the first file
        moved.append(dst)
        Path(src).replace(dst)

    monkeypatch.setattr(folders, "replace_durably", replace_once)
    with pytest.raises(KeyboardInterrupt):
        files.commit()
    assert (out / folders.JOURNAL).is_file()
    monkeypatch.undo()
    with folders.folder_lock(out):  # the next run opens the folder: the set is finished
        pass
    assert (out / "a.txt").read_text() == "new a" and (out / "b.txt").read_text() == "new b"
    assert visible(out) == ["a.txt", "b.txt"]


def test_orphan_temp_files_of_killed_runs_are_cleaned(world, tmp_path):  # noqa: F811
    import shutil

    work = Path(shutil.copytree(world["work"], tmp_path / "work"))
    orphans = [work / ".factors-ekfac.safetensors.0123456789ab.tmp",
               work / "corpus" / ".tokens.safetensors.0123456789ab.tmp",
               work / "corpus" / ".packing-x1y2" / "ids.bin"]
    for path in orphans:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    assert main(lm("fit", world, tmp_path, work=work)) == 0
    assert not any(p.exists() for p in orphans)
    assert not (work / "corpus" / ".packing-x1y2").exists()


_HOLDER = """
import sys, time
from datasleuth.folders import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold(folder: Path, seconds: float) -> subprocess.Popen:
    src = str(Path(datasleuth.__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), str(seconds)],
                            stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": src,
                                                                    "PATH": "/usr/bin:/bin"})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_the_same_folder_waits_or_says_who_holds_it(tmp_path, capsys):
    folder = tmp_path / "work"
    holder = _hold(folder, 2.0)
    try:
        with pytest.raises(DatasleuthError, match=f"in use by process {holder.pid}; wait"), \
                folders.folder_lock(folder, wait=False):
            pass
        capsys.readouterr()
        start = time.monotonic()
        with folders.folder_lock(folder):  # waits for the holder to let go
            waited = time.monotonic() - start
        assert waited > 0.5
        assert f"waiting for process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_a_kill_during_the_final_factors_write_keeps_the_snapshot(world, tmp_path, capsys,  # noqa: F811
                                                                  monkeypatch):
    from datasleuth.curvature import Curvature

    argv = lm("fit", world, tmp_path)
    with monkeypatch.context() as m:
        m.setattr(Curvature, "save", _killed)
        assert main(argv) == 130
    snapshot = tmp_path / "work" / ".fit-ekfac.checkpoint.safetensors"
    assert snapshot.is_file() and not (tmp_path / "work" / "factors-ekfac.safetensors").exists()
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming the fit" in capsys.readouterr().err
    assert not snapshot.exists()
    got = load_file(tmp_path / "work" / "factors-ekfac.safetensors")
    want = load_file(world["work"] / "factors-ekfac.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_a_refused_run_leaves_no_new_folder(world, tmp_path, capsys):  # noqa: F811
    argv = lm("trace", world, tmp_path, model=tmp_path / "no-such-model")
    assert main(argv) == 2
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
