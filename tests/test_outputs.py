"""Results people can open: file modes, the long Parquet table, ``--config`` keys equal to
``--help`` names, the resolved configuration, the closing summary line, progress units."""

from __future__ import annotations

import json
import os
import re
import stat

import click
import pandas as pd
import pytest
import torch
from test_hf_names import CHAT_TEMPLATE, TEXTS, tiny_model

from datasleuth.cli import main
from datasleuth.cli.main import cli
from datasleuth.cli.options import RESOLVED_CONFIG, config_defaults
from datasleuth.demo import build_tokenizer

QUERIES = [{"id": "paris", "prompt": "the capital of france is", "completion": " paris"},
           {"id": "four", "prompt": "two plus two", "completion": " equals four"}]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny random GPT-2 with its tokenizer, a corpus with id/title columns, queries."""
    root = tmp_path_factory.mktemp("small")
    tok = build_tokenizer(TEXTS, vocab_size=300, max_length=64)
    tok.chat_template = CHAT_TEMPLATE
    model_dir = root / "model"
    tiny_model(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": f"doc-{i}", "title": f"Title {i}"})
                              + "\n" for i, t in enumerate(TEXTS)))
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    return {"model": str(model_dir), "corpus": str(corpus), "queries": str(queries)}


def _common(small, tmp_path) -> list[str]:
    return ["--model", small["model"], "--corpus", small["corpus"], "--seq-len", "8",
            "--workdir", str(tmp_path / "work"), "--no-progress", "--threads", "1"]


def _modes(root) -> dict[str, int]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = stat.S_IMODE(os.stat(path).st_mode)
    return out


def test_files_follow_the_umask(small, tmp_path):
    common = _common(small, tmp_path)
    old = os.umask(0o027)
    try:
        assert main(["index", *common, "--out", str(tmp_path / "index"),
                     "--shard-size", "7"]) == 0
        assert main(["trace", *common, "--queries", small["queries"], "--out",
                     str(tmp_path / "out"), "--all-scores", "--filter", "bm25",
                     "--candidates", "5"]) == 0
        assert main(["trace", *common, "--queries", small["queries"], "--out",
                     str(tmp_path / "out2"), "--index", str(tmp_path / "index"),
                     "--rescore", "4", "--top-k", "3", "--bottom-k", "1"]) == 0
        assert main(["self-influence", *common, "--out", str(tmp_path / "self")]) == 0
    finally:
        os.umask(old)
    modes = {}
    for name in ("work", "index", "out", "out2", "self"):
        modes.update({f"{name}/{k}": v for k, v in _modes(tmp_path / name).items()})
        modes[name] = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
    for expected in ("out/results.json", "out/results.parquet", "out/report.html",
                     "out/config.resolved.json", "self/self_influence.parquet",
                     "work/corpus/tokens.safetensors", "work/factors-ekfac.safetensors",
                     "index/manifest.json"):
        assert expected in modes, sorted(modes)
    wrong = {k: oct(v) for k, v in modes.items()
             if v != (0o750 if os.path.isdir(tmp_path / k) else 0o640)}
    assert not wrong, wrong


def test_long_table_round_trips_into_pandas(small, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["trace", *_common(small, tmp_path), "--queries", small["queries"],
                 "--out", str(out), "--top-k", "3", "--bottom-k", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    table = pd.read_parquet(out / "results.parquet")
    assert list(table.columns) == ["query_id", "method", "list", "rank", "score", "sequence",
                                   "doc_index", "id", "title", "char_start", "char_end", "text"]
    want = [(q["id"], which, row["rank"], row["score"], row["index"], d["doc_index"])
            for q in results["queries"] for which in ("top", "bottom") for row in q[which]
            for d in row["documents"]]
    got = list(zip(table["query_id"], table["list"], table["rank"], table["score"],
                   table["sequence"], table["doc_index"], strict=True))
    assert got == want and set(table["method"]) == {"ekfac"}
    for row in table.itertuples():
        assert row.id == f"doc-{row.doc_index}" and row.title == f"Title {row.doc_index}"
        assert row.text == TEXTS[row.doc_index][row.char_start:row.char_end]
    first = results["queries"][0]["top"][0]["documents"][0]
    assert first["id"] == f"doc-{first['doc_index']}"  # results.json names documents too
    err = capsys.readouterr().err
    assert re.search(r"done: trace of 2 queries in [\d.]+ s \(\d+ sequences, [\d.]+ "
                     r"sequences/s\)", err), err


def test_resolved_configuration_replays_the_run(small, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["trace", *_common(small, tmp_path), "--queries", small["queries"],
                 "--out", str(out), "--top-k", "2", "--no-report"]) == 0
    saved = json.loads((out / RESOLVED_CONFIG).read_text())
    assert saved["command"] == "trace" and saved["top-k"] == 2 and saved["no-report"] is True
    assert os.path.isabs(saved["model"]) and os.path.isabs(saved["out"])
    assert saved["progress"] is False and saved["corpus"] == [small["corpus"]]
    first = (out / "results.json").read_text()
    capsys.readouterr()
    assert main(["trace", "--config", str(out / RESOLVED_CONFIG)]) == 0
    assert "reusing" in capsys.readouterr().err  # same inputs: the same results, reused
    assert (out / "results.json").read_text() == first
    assert main(["fit", "--config", str(out / RESOLVED_CONFIG)]) == 2
    assert "`datasleuth trace`" in capsys.readouterr().err


def test_python_api_takes_in_memory_and_chat_queries(small, tmp_path):
    from datasleuth.lm import LoadOptions, TraceConfig, TraceOptions, trace_queries

    load = LoadOptions(small["model"], small["corpus"], workdir=tmp_path / "work", seq_len=8)
    config = TraceConfig(top_k=3, bottom_k=0)
    chat = {"id": "chat", "messages": [{"role": "user", "content": "two plus two"},
                                       {"role": "assistant", "content": "equals four"}]}
    runs = {}
    for name, queries in (("file", small["queries"]), ("list", QUERIES + [chat])):
        runs[name] = trace_queries(load, TraceOptions(queries, out=tmp_path / name,
                                                      config=config, report=False),
                                   progress=False)
    for got, want in zip(runs["list"]["queries"], runs["file"]["queries"]):
        assert [r["index"] for r in got["top"]] == [r["index"] for r in want["top"]]
        assert [r["score"] for r in got["top"]] == pytest.approx([r["score"] for r in want["top"]])
    rendered = runs["list"]["queries"][2]
    assert rendered["prompt"] == "user: two plus two\nassistant:"
    assert rendered["completion"] == " equals four\n"
    assert "chat" in set(pd.read_parquet(tmp_path / "list" / "results.parquet")["query_id"])


def _valid_value(param: click.Parameter):
    """A value the option accepts, for a config file."""
    kind = param.type
    if getattr(param, "is_flag", False):
        return True
    if isinstance(kind, click.Choice):
        return kind.choices[0]
    if isinstance(kind, (click.IntRange, click.FloatRange)):
        return kind.min if kind.min is not None else 1
    if kind is click.INT:
        return 1
    if kind is click.FLOAT:
        return 0.5
    return ["x"] if param.multiple else "x"


def test_config_keys_are_the_help_option_names_on_every_command():
    for name, command in cli.commands.items():
        ctx = click.Context(command, info_name=name)
        records = [p.get_help_record(ctx) for p in command.get_params(ctx)]
        shown = {m for r in records if r for m in re.findall(r"--([a-z][a-z0-9-]*)", r[0])}
        shown -= {"help", "config"}
        assert shown, name
        params = {o.lstrip("-"): p for p in command.params for o in
                  [*p.opts, *getattr(p, "secondary_opts", [])] if o.startswith("--")}
        assert shown == set(params) - {"help", "config"}, name
        for option in sorted(shown):
            param = params[option]
            value = _valid_value(param)
            got = config_defaults(ctx, {option: value}, "cfg.toml")
            inverted = option in [o.lstrip("-") for o in getattr(param, "secondary_opts", [])]
            assert got == {param.name: (not value) if inverted else value}, (name, option)


def test_threads_option_on_every_language_model_command(small, tmp_path):
    before = torch.get_num_threads()
    try:
        for name in ("fit", "trace", "index", "self-influence", "evaluate"):
            command = cli.commands[name]
            assert "--threads" in [o for p in command.params for o in p.opts], name
        cli.commands["fit"].make_context("fit", ["--model", "m", "--corpus", "c",
                                                 "--threads", "2"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_progress_counts_sequences_not_batches(monkeypatch):
    import datasleuth.progress as progress

    bars = []

    class Recorder:
        def __init__(self, iterable=None, **kwargs):
            self.kwargs, self.n = kwargs, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(progress, "tqdm", Recorder)
    monkeypatch.setenv("DATASLEUTH_PROGRESS", "1")
    data = list(range(23))
    loader = torch.utils.data.DataLoader(
        data, batch_size=5, collate_fn=lambda ids: {"input_ids": torch.zeros(len(ids), 4)})
    assert sum(b["input_ids"].shape[0] for b in progress.progress_bar(loader, "scan")) == 23
    assert bars[-1].kwargs["total"] == 23 and bars[-1].n == 23
    assert bars[-1].kwargs["unit"] == "sequence"
    with progress.progress_counter("index", total=10, initial=4) as counter:
        counter.update(6)
    assert bars[-1].n == 6 and bars[-1].kwargs["initial"] == 4
