"""The README's Python example runs as printed (it is the API's front door)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "torch.Size([4, 200]) torch.Size([4, 200, 2])" in out
    assert out.count("training example") == 3
    assert (tmp_path / "factors.safetensors").is_file()


def test_readme_language_model_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    lm = [b for b in blocks if "datasleuth.lm" in b]
    assert lm, "the README has no language-model example"
    monkeypatch.chdir(tmp_path)
    exec(compile(lm[0], "README.md", "exec"), {"__name__": "readme"})
    index, score, _ = capsys.readouterr().out.strip().splitlines()[-1].split(" ", 2)
    assert int(index) >= 0 and float(score) > 0
    assert (tmp_path / "out" / "results.json").is_file()
