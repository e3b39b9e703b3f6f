"""Ctrl-C (SIGINT) and SIGTERM snapshot a fit or a scan first; the re-run resumes there."""

from __future__ import annotations

import json
import os
import signal

import pytest
from test_bad_inputs import lm, world  # noqa: F401 -- the module's tiny model and corpus

import datasleuth.fitting as fitting
import datasleuth.lm.trace as trace
from datasleuth.cli import main


def _signal_after(monkeypatch, owner, name: str, calls: int, signum: int) -> list[int]:
    """Send ``signum`` to this process from the ``calls``-th call of ``owner.name``."""
    seen: list[int] = []
    real = getattr(owner, name)

    def wrapped(self, *args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return seen


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_scan_saves_and_the_rerun_resumes_there(world, tmp_path, capsys,  # noqa: F811
                                                                    monkeypatch, signum):
    argv = lm("trace", world, tmp_path, "--batch-size", "1", work=world["work"])
    with monkeypatch.context() as m:
        _signal_after(m, trace._ScanState, "update", 3, signum)
        capsys.readouterr()
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "error: interrupted; re-run the same command to resume" in err
    assert (tmp_path / "out" / ".scan-checkpoint.safetensors").is_file()
    assert not (tmp_path / "out" / "results.json").exists()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resumed the scan after 3 sequences" in err, err
    got = json.loads((tmp_path / "out" / "results.json").read_text())
    want = json.loads((world["results"] / "results.json").read_text())
    top = [(r["index"], r["score"]) for r in got["queries"][0]["top"]]
    assert [i for i, _ in top] == [r["index"] for r in want["queries"][0]["top"]]
    assert [s for _, s in top] == pytest.approx([r["score"] for r in want["queries"][0]["top"]],
                                                rel=1e-4)
    assert not (tmp_path / "out" / ".scan-checkpoint.safetensors").exists()


def test_sigint_during_a_fit_saves_and_the_rerun_resumes(world, tmp_path, capsys,  # noqa: F811
                                                         monkeypatch):
    argv = lm("fit", world, tmp_path, "--batch-size", "1", "--curvature", "diagonal")
    with monkeypatch.context() as m:
        _signal_after(m, fitting._Checkpoint, "save", 4, signal.SIGINT)
        assert main(argv) == 130
    snapshot = tmp_path / "work" / ".fit-diagonal.checkpoint.safetensors"
    assert snapshot.is_file()
    from datasleuth.storage import load_tensors

    assert load_tensors(snapshot)[1]["batches"] == 4
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming the fit" in capsys.readouterr().err
    assert not snapshot.exists()
