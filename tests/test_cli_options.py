"""``--config`` files (tomllib on 3.11+, tomli on 3.10) and the workflow's option types."""

from __future__ import annotations

import sys
import types

import click
import pytest

from datasleuth.cli import main
from datasleuth.cli import options as cli_options
from datasleuth.cli.lm import fit as fit_command
from datasleuth.cli.lm import trace as trace_command
from datasleuth.cli.lm import trace_options_from
from datasleuth.errors import DatasleuthError
from datasleuth.lm import (
    Candidates,
    FitOptions,
    IndexOptions,
    LoadOptions,
    SelfInfluenceOptions,
    TraceConfig,
    TraceOptions,
)

TOML = cli_options.toml_module()  # tomllib, or tomli on Python 3.10


@pytest.fixture
def fake_tomli(monkeypatch):
    """A stand-in ``tomli`` package (tomllib's API) that records its calls."""
    module = types.ModuleType("tomli")
    module.calls = []

    def loads(text):
        module.calls.append(text)
        return TOML.loads(text)

    module.loads = loads
    module.TOMLDecodeError = TOML.TOMLDecodeError
    monkeypatch.setitem(sys.modules, "tomli", module)
    return module


def test_toml_reader_is_tomllib_on_311_and_tomli_on_310(fake_tomli, monkeypatch):
    if sys.version_info >= (3, 11):
        import tomllib

        assert cli_options.toml_module((3, 11)) is tomllib
        assert cli_options.toml_module((3, 13)) is tomllib
    assert cli_options.toml_module((3, 10)) is fake_tomli
    monkeypatch.setitem(sys.modules, "tomli", None)  # not installed
    with pytest.raises(DatasleuthError, match="needs the tomli package"):
        cli_options.toml_module((3, 10))


def test_config_file_read_through_tomli_on_python_310(fake_tomli, monkeypatch, tmp_path):
    monkeypatch.setattr(cli_options, "sys", types.SimpleNamespace(version_info=(3, 10, 14)))
    path = tmp_path / "cfg.toml"
    path.write_text('curvature = "kfac"\nseq-len = 32\n')
    assert cli_options.read_config(path) == {"curvature": "kfac", "seq-len": 32}
    assert fake_tomli.calls == [path.read_text()]
    json_path = tmp_path / "cfg.json"
    json_path.write_text('{"top-k": 3}')
    assert cli_options.read_config(json_path) == {"top-k": 3}
    assert len(fake_tomli.calls) == 1  # JSON is read without tomli


@pytest.mark.parametrize("case", ["missing", "directory", "toml", "json", "binary", "list"])
def test_bad_config_file_is_one_line(tmp_path, case):
    path = {"missing": tmp_path / "none.toml", "directory": tmp_path,
            "toml": tmp_path / "a.toml", "json": tmp_path / "a.json",
            "binary": tmp_path / "b.toml", "list": tmp_path / "l.json"}[case]
    if case == "toml":
        path.write_text('seq-len = \n')
    elif case == "json":
        path.write_text('{"seq-len": 3,,}')
    elif case == "binary":
        path.write_bytes(b"\xff\xfe\x00")
    elif case == "list":
        path.write_text("[1, 2]")
    with pytest.raises(DatasleuthError) as err:
        cli_options.read_config(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_config_keys_are_option_names_and_values_are_checked():
    ctx = click.Context(trace_command)
    got = cli_options.config_defaults(ctx, {
        "model": "m", "corpus": "c.jsonl", "seq-len": 32, "out": "o", "filter": "bm25",
        "no_report": True, "top_k": 3}, "cfg.toml")
    assert got == {"model_path": "m", "corpus_path": ["c.jsonl"], "seq_len": 32,
                   "out_dir": "o", "filter_kind": "bm25", "no_report": True, "top_k": 3}
    for bad, words in (({"seq-len": "long"}, "seq-len"), ({"filter": "tfidf"}, "filter"),
                       ({"bogus": 1, "config": "x"}, "bogus, config")):
        with pytest.raises(DatasleuthError, match=words):
            cli_options.config_defaults(ctx, bad, "cfg.toml")


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text('seq-len = "long"\n')
    code = main(["fit", "--config", str(cfg), "--model", "m", "--corpus", "c"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "seq-len" in err[0]
    code = main(["fit", "--config", str(tmp_path / "none.toml"), "--model", "m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not exist" in err[0]


def test_cli_options_build_the_workflow_option_types():
    values = trace_command.make_context("trace", [
        "--model", "m", "--corpus", "a.jsonl", "--corpus", "b", "--queries", "q.jsonl",
        "--filter", "bm25", "--candidates", "50", "--rank", "4", "--top-k", "3",
        "--no-report"]).params
    trace = trace_options_from(values)
    assert trace == TraceOptions("q.jsonl", out="datasleuth-out",
                                 config=TraceConfig(top_k=3, bottom_k=10, batch_size=8),
                                 candidates=Candidates(bm25=50, rank=4), report=False)
    load = cli_options.load_options_from(values)
    assert load == LoadOptions("m", ["a.jsonl", "b"])
    assert load.corpus == ("a.jsonl", "b") and load.workdir == "datasleuth-work"
    fit_values = fit_command.make_context("fit", ["--model", "m", "--corpus", "c"]).params
    assert cli_options.fit_options_from(fit_values) == FitOptions()
    budget = fit_command.make_context("fit", ["--model", "m", "--corpus", "c",
                                              "--max-factor-memory", "1.5"]).params
    assert cli_options.fit_options_from(budget).config.max_factor_memory == 3 * 2**29


def test_option_types_refuse_bad_values_before_any_work():
    with pytest.raises(DatasleuthError, match="drop --rank"):
        Candidates(rank=4, index="idx")
    with pytest.raises(DatasleuthError, match="--index"):
        Candidates(approximate=True)
    with pytest.raises(DatasleuthError, match="all-scores"):
        TraceOptions("q.jsonl", candidates=Candidates(index="idx"), all_scores=True)
    with pytest.raises(DatasleuthError, match="corpus"):
        LoadOptions("m", [])
    with pytest.raises(DatasleuthError, match="dtype"):
        LoadOptions("m", "c", dtype="int8")
    with pytest.raises(DatasleuthError, match="seq_len"):
        LoadOptions("m", "c", seq_len=1)
    with pytest.raises(DatasleuthError, match="batch_size"):
        FitOptions(batch_size=0)
    with pytest.raises(DatasleuthError, match="top_k"):
        SelfInfluenceOptions(top_k=0)
    with pytest.raises(DatasleuthError, match="fisher"):
        IndexOptions(fisher="true")


def test_lm_package_exports_the_language_model_api():
    import datasleuth.lm as lm
    from datasleuth.lm import workflow

    assert all(hasattr(lm, name) for name in lm.__all__)
    assert set(workflow.__all__) <= set(lm.__all__)
    assert {"load_model", "default_layers", "CausalLMTask", "PackedCorpus", "prepare_corpus",
            "TraceConfig", "FitConfig", "trace_queries", "LoadOptions"} <= set(lm.__all__)
