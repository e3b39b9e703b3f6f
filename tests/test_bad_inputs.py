"""Bad input of every kind: exit status 2, one ``error:`` line naming the fix, no traceback,
and no output left that looks complete (README "Reliability"; issue 10).

One tiny model, corpus and fitted work folder are built per module; each case copies
what it damages. Cases run in-process through :func:`datasleuth.cli.main`.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hf_names import TEXTS, tiny_model

from datasleuth.cli import main
from datasleuth.demo import build_tokenizer

CORPUS = TEXTS[:10]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Model folder, NaN-weights model folder, corpus, queries and a fitted work folder."""
    root = tmp_path_factory.mktemp("bad")
    tok = build_tokenizer(TEXTS, vocab_size=300)
    model = root / "model"
    tiny_model(300).save_pretrained(model)
    tok.save_pretrained(model)
    nan = root / "nan-model"
    broken = tiny_model(300)
    with torch.no_grad():
        broken.transformer.h[0].mlp.c_proj.weight[0, 0] = float("nan")
    broken.save_pretrained(nan)
    tok.save_pretrained(nan)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    queries = root / "queries.jsonl"
    queries.write_text(json.dumps({"prompt": "the cat", "completion": " sat on the mat"}) + "\n")
    work = root / "work"
    code = main(["fit", "--model", str(model), "--corpus", str(corpus), "--workdir", str(work),
                 "--seq-len", "16", "--no-progress"])
    assert code == 0
    results = root / "results"
    code = main(["trace", "--model", str(model), "--corpus", str(corpus), "--workdir",
                 str(work), "--seq-len", "16", "--queries", str(queries), "--out",
                 str(results), "--top-k", "2", "--bottom-k", "0", "--no-progress"])
    assert code == 0
    return {"root": root, "model": model, "nan": nan, "corpus": corpus, "queries": queries,
            "work": work, "results": results}


def expect_refusal(argv: list[str], capsys, fix: str) -> str:
    """Run ``argv``; assert exit 2, exactly one ``error:`` line containing ``fix``."""
    capsys.readouterr()
    try:
        code = main(argv)
    except BaseException as e:  # noqa: BLE001 -- a traceback is the failure being tested
        pytest.fail(f"{argv[0]} raised {type(e).__name__}: {e}")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 2, (code, err)
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert fix.lower() in errors[0].lower(), errors[0]
    return errors[0]


def lm(command: str, w: dict[str, Path], tmp: Path, *extra: str, model: Path | None = None,
       corpus: Path | None = None, work: Path | None = None) -> list[str]:
    """argv of an LM command on the module's tiny inputs (trace gets the queries and --out)."""
    argv = [command, "--model", str(model or w["model"]), "--corpus", str(corpus or w["corpus"]),
            "--workdir", str(work or tmp / "work"), "--seq-len", "16", "--no-progress"]
    if command == "trace":
        argv += ["--queries", str(w["queries"]), "--top-k", "2", "--bottom-k", "0"]
    if command in ("trace", "index", "self-influence") and "--out" not in extra:
        argv += ["--out", str(tmp / "out")]
    return argv + list(extra)


def visible(folder: Path) -> list[str]:
    """Files of ``folder`` a user would take for output (not the lock or hidden state)."""
    return sorted(p.name for p in folder.rglob("*") if not p.name.startswith(".")) \
        if folder.exists() else []


def fitted(w: dict[str, Path], tmp: Path) -> Path:
    """A private copy of the fitted work folder."""
    return Path(shutil.copytree(w["work"], tmp / "work"))


# --- model and weights -------------------------------------------------------------------


def model_copy(w: dict[str, Path], tmp: Path) -> Path:
    return Path(shutil.copytree(w["model"], tmp / "m"))


def config_edit(**changes) -> Callable[[dict, Path], Path]:
    def make(w, tmp):
        folder = model_copy(w, tmp)
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder
    return make


def truncated_weights(w, tmp):
    folder = model_copy(w, tmp)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def garbage_weights(w, tmp):
    folder = model_copy(w, tmp)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return folder


def missing_weight(w, tmp):
    folder = model_copy(w, tmp)
    tensors = load_file(folder / "model.safetensors")
    del tensors["transformer.h.0.mlp.c_fc.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def pickle_only(w, tmp):
    folder = model_copy(w, tmp)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 pretend zip pickle")
    return folder


def no_config(w, tmp):
    folder = model_copy(w, tmp)
    (folder / "config.json").unlink()
    return folder


MODEL_CASES = {
    "more layers in config": (config_edit(n_layer=3), "weights"),
    "sizes differ from weights": (config_edit(n_inner=64), "config"),
    "truncated safetensors": (truncated_weights, "safetensors"),
    "garbage safetensors": (garbage_weights, "safetensors"),
    "weight missing": (missing_weight, "transformer.h.0.mlp.c_fc"),
    "pickle-only checkpoint": (pickle_only, "safetensors"),
    "custom code": (config_edit(auto_map={"AutoModelForCausalLM": "modeling_x.XModel"},
                                model_type="xmodel-custom"), "--trust-remote-code"),
    "no config.json": (no_config, "config.json"),
}


@pytest.mark.parametrize(("case", "command"), [(case, "fit") for case in sorted(MODEL_CASES)] + [
    (case, command) for case in ("more layers in config", "pickle-only checkpoint")
    for command in ("trace", "index", "self-influence")])  # the loader is shared
def test_a_model_that_does_not_match_its_config_is_refused(world, tmp_path, capsys, case,
                                                            command):
    make, fix = MODEL_CASES[case]
    folder = make(world, tmp_path)
    expect_refusal(lm(command, world, tmp_path, model=folder), capsys, fix)
    assert not list((tmp_path / "work").glob("factors-*"))
    assert not visible(tmp_path / "out")


# --- non-finite values --------------------------------------------------------------------


@pytest.mark.parametrize(("command", "extra"), [
    ("fit", ()), ("fit", ("--fisher", "empirical")), ("fit", ("--curvature", "diagonal")),
    ("fit", ("--curvature", "kfac")), ("trace", ("--curvature", "identity")),
    ("self-influence", ("--curvature", "identity")), ("index", ()),
])
def test_nan_in_one_layer_is_named(world, tmp_path, capsys, command, extra):
    line = expect_refusal(lm(command, world, tmp_path, *extra, model=world["nan"]), capsys,
                          "check the model's weights")
    assert "transformer.h.0.mlp.c_proj" in line
    assert not list((tmp_path / "work").glob("factors-*"))
    for name in ("results.json", "self_influence.json", "manifest.json"):
        assert not (tmp_path / "out" / name).exists()


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
@pytest.mark.parametrize("command", ["fit", "trace", "self-influence"])
def test_damping_must_be_finite_and_positive(world, tmp_path, capsys, command, value):
    expect_refusal(lm(command, world, tmp_path, f"--damping={value}"), capsys, "damping")


def test_evaluate_damping_must_be_finite_and_positive(capsys, tmp_path):
    expect_refusal(["evaluate", "--damping", "inf", "--out", str(tmp_path / "e")], capsys,
                   "damping")


# --- input files --------------------------------------------------------------------------


def bad_utf8_jsonl(w, tmp):
    path = tmp / "c.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff\xfe byte"}\n')
    return path


def bad_utf8_text(w, tmp):
    path = tmp / "c.txt"
    path.write_bytes(b"fine line\nsecond \xc3\x28 line\n")
    return path


def empty_corpus(w, tmp):
    path = tmp / "c.jsonl"
    path.write_text("")
    return path


def bad_json_corpus(w, tmp):
    path = tmp / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    return path


CORPUS_CASES = {
    "invalid utf-8 jsonl": (bad_utf8_jsonl, ":2: not valid UTF-8"),
    "invalid utf-8 text": (bad_utf8_text, ":2: not valid UTF-8"),
    "empty corpus": (empty_corpus, "document"),
    "broken json line": (bad_json_corpus, ":2: malformed JSON"),
}


@pytest.mark.parametrize(("case", "command"), [(case, "fit") for case in sorted(CORPUS_CASES)] + [
    ("invalid utf-8 jsonl", command) for command in ("index", "self-influence")])
def test_a_bad_corpus_is_refused(world, tmp_path, capsys, case, command):
    make, fix = CORPUS_CASES[case]
    path = make(world, tmp_path)
    line = expect_refusal(lm(command, world, tmp_path, corpus=path), capsys, fix)
    assert str(path) in line
    assert not (tmp_path / "work" / "corpus" / "metadata.json").exists()


@pytest.mark.parametrize(("content", "fix"), [
    (b'{"prompt": "a", "completion": "b \xff"}\n', ":1: not valid UTF-8"),
    (b'{"prompt": "a"}\n', "completion"),
    (b"not json\n", ":1: malformed JSON"),
    (b"", "query"),
])
def test_bad_queries_are_refused(world, tmp_path, capsys, content, fix):
    work = fitted(world, tmp_path)
    queries = tmp_path / "q.jsonl"
    queries.write_bytes(content)
    argv = lm("trace", world, tmp_path, work=work)
    argv[argv.index("--queries") + 1] = str(queries)
    expect_refusal(argv, capsys, fix)
    assert not (tmp_path / "out" / "results.json").exists()


def drop_tensor(path: Path) -> None:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    tensors = load_file(path)
    name = next(k for k in tensors if k.endswith("/eigenvalues"))
    del tensors[name]
    save_file(tensors, path, metadata=meta)


def test_factors_missing_a_tensor_are_refused_or_refitted(world, tmp_path, capsys):
    """A factors file missing a tensor is never used: it is fitted again (exit 0)."""
    work = fitted(world, tmp_path)
    factors = work / "factors-ekfac.safetensors"
    drop_tensor(factors)
    capsys.readouterr()
    code = main(lm("trace", world, tmp_path, work=work))
    err = capsys.readouterr().err
    assert code == 0 and "re-fitting" in err and "eigenvalues" in err, err
    assert len(load_file(factors)) > 0 and any(k.endswith("/eigenvalues")
                                                 for k in load_file(factors))


def test_factors_file_missing_a_tensor_given_to_the_library_is_refused(world, tmp_path):
    from datasleuth.errors import DatasleuthError
    from datasleuth.storage import load_curvature

    work = fitted(world, tmp_path)
    factors = work / "factors-ekfac.safetensors"
    drop_tensor(factors)
    with pytest.raises(DatasleuthError, match="is missing the tensor .*eigenvalues.*re-run"):
        load_curvature(factors)


@pytest.mark.parametrize(("text", "fix"), [
    ("seq-len = [16, 32]\n", "seq-len"),
    ("seq-len = \n", "TOML"),
    ("damping = \"lots\"\n", "damping"),
])
def test_bad_config_files_are_refused(world, tmp_path, capsys, text, fix):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    expect_refusal(lm("fit", world, tmp_path, "--config", str(cfg)), capsys, fix)


@pytest.mark.parametrize(("text", "fix"), [
    ("recipe = (\n", ":1: syntax error"),
    ("x = 1\n", "recipe"),
    ("raise RuntimeError('boom')\n", "boom"),
])
def test_bad_recipe_files_are_refused(tmp_path, capsys, text, fix):
    path = tmp_path / "r.py"
    path.write_text(text)
    expect_refusal(["evaluate", "--recipe", str(path), "--out", str(tmp_path / "e")], capsys,
                   fix)
    assert not (tmp_path / "e" / "results.json").exists()


@pytest.mark.parametrize(("content", "fix"), [
    (b"{not json", "json"),
    (b"[]", "results"),
    (b'{"queries": 3}', "results"),
    (b'{"a": "\xff"}', "utf-8"),
])
def test_bad_results_files_are_refused_by_report(tmp_path, capsys, content, fix):
    path = tmp_path / "results.json"
    path.write_bytes(content)
    expect_refusal(["report", str(path)], capsys, fix)
    assert not (tmp_path / "report.html").exists()


def test_report_of_a_missing_file_is_refused(tmp_path, capsys):
    expect_refusal(["report", str(tmp_path / "none.json")], capsys, "not found")


def test_evaluate_tail_patch_of_bad_json_is_refused(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text("{oops")
    expect_refusal(["evaluate", "--tail-patch", str(path), "--out", str(tmp_path / "e")], capsys,
                   "json")


# --- output folders -----------------------------------------------------------------------


def out_is_file(tmp: Path) -> Path:
    path = tmp / "out"
    path.write_text("a file")
    return path


def out_under_file(tmp: Path) -> Path:
    (tmp / "blocker").write_text("a file")
    return tmp / "blocker" / "out"


@pytest.mark.parametrize("command", ["trace", "index", "self-influence"])
@pytest.mark.parametrize("make", [out_is_file, out_under_file])
def test_an_output_folder_that_cannot_be_written_is_refused_before_work(
        world, tmp_path, capsys, command, make):
    out = make(tmp_path)
    expect_refusal(lm(command, world, tmp_path, "--out", str(out)), capsys, "--out")
    assert not (tmp_path / "work" / "corpus").exists()  # refused before packing


@pytest.mark.parametrize("trouble", ["read-only", "full"])
@pytest.mark.parametrize("command", ["fit", "trace", "self-influence"])
def test_a_read_only_or_full_folder_is_refused_before_work(world, tmp_path, capsys, monkeypatch,
                                                           command, trouble):
    import errno
    import os
    from collections import namedtuple

    import datasleuth.storage as storage

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if "write-probe" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    if trouble == "read-only":
        monkeypatch.setattr(storage.os, "open", read_only)
        fix = "(Read-only file system); choose a writable folder"
    else:
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 4096))
        fix = "full disk (4096 bytes free); free some space"
    expect_refusal(lm(command, world, tmp_path), capsys, fix)
    assert not (tmp_path / "work" / "corpus").exists()
    assert not list(tmp_path.rglob("*write-probe*"))


# --- damaged work folders are rebuilt, never used -----------------------------------------


@pytest.mark.parametrize("name", ["segments.parquet", "documents.arrow", "tokens.safetensors"])
def test_a_damaged_packing_is_packed_again(world, tmp_path, capsys, name):
    work = fitted(world, tmp_path)
    (work / "corpus" / name).write_bytes(b"PAR1 garbage")
    capsys.readouterr()
    assert main(lm("fit", world, tmp_path, work=work)) == 0
    err = capsys.readouterr().err
    assert "packing again" in err and "damaged" in err, err
    from datasleuth.lm.corpus import PackedCorpus

    corpus = PackedCorpus.load(work / "corpus")
    assert corpus.segments(0) and corpus.document_text(corpus.segments(0)[0].doc_index)


def test_an_in_place_edit_with_the_same_size_and_mtime_is_packed_again(world, tmp_path, capsys):
    import os

    corpus = tmp_path / "c.jsonl"
    shutil.copy(world["corpus"], corpus)
    argv = lm("fit", world, tmp_path, "--curvature", "diagonal", corpus=corpus)
    assert main(argv) == 0
    before = os.stat(corpus)
    data = corpus.read_bytes()
    edited = data.replace(b"the cat sat", b"the dog sat", 1)
    assert edited != data and len(edited) == len(data)
    corpus.write_bytes(edited)
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(corpus).st_size == before.st_size
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "packed 10 documents" in err and "reusing packed corpus" not in err, err
    from datasleuth.lm.corpus import PackedCorpus

    assert "the dog sat" in PackedCorpus.load(tmp_path / "work" / "corpus").document_text(0)
    capsys.readouterr()
    assert main(argv) == 0  # unchanged now: reused
    assert "reusing packed corpus" in capsys.readouterr().err
