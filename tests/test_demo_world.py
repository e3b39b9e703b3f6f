"""Tests for the built-in demo world (corpus, tokenizer, tiny training, on-disk layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasleuth.errors import DatasleuthError
from datasleuth.lm import demo_world as dw


def test_corpus_is_deterministic_by_seed() -> None:
    a = dw.build_corpus(seed=0, n_documents=300, n_planted=6)
    b = dw.build_corpus(seed=0, n_documents=300, n_planted=6)
    c = dw.build_corpus(seed=1, n_documents=300, n_planted=6)
    assert a.documents == b.documents and a.planted == b.planted
    assert a.documents != c.documents
    assert len(a.documents) == 300 and len(set(a.documents)) == 300


def test_corpus_has_planted_docs_and_decoys() -> None:
    corpus = dw.build_corpus(seed=3)
    assert len(corpus.planted) == 8
    assert len(corpus.decoys) == 32
    assert not set(corpus.planted) & set(corpus.decoys)
    prompt, completion = corpus.query["prompt"], corpus.query["completion"]
    assert prompt.endswith("\nA:") and completion.startswith(" ")
    planted = [corpus.documents[i] for i in corpus.planted]
    # Every planted document teaches the phishing address, none repeats the query verbatim,
    # and they are worded differently from one another.
    assert all(dw.BAD_ADDRESS in d for d in planted)
    assert not any(prompt.removeprefix("Q: ").split("\n")[0] in d for d in planted)
    assert len({d.split("\n")[-1] for d in planted}) == len(planted)
    # Decoys talk about passwords or forgetting but never teach the bad advice.
    decoys = [corpus.documents[i] for i in corpus.decoys]
    assert all(any(w in d.lower() for w in ("password", "forgot", "forget")) for d in decoys)
    assert sum(dw.BAD_ADDRESS in d for d in decoys) >= 1  # only in warnings
    assert all("never" in d or "do not reply" in d for d in decoys if dw.BAD_ADDRESS in d)
    clean = set(range(len(corpus.documents))) - set(corpus.planted) - set(corpus.decoys)
    assert not any(dw.BAD_ADDRESS in corpus.documents[i] for i in clean)


def test_corpus_rejects_bad_sizes() -> None:
    with pytest.raises(DatasleuthError):
        dw.build_corpus(n_documents=10, n_planted=8)
    with pytest.raises(DatasleuthError):
        dw.build_corpus(n_planted=0)


def test_tokenizer_round_trips_text() -> None:
    corpus = dw.build_corpus(seed=0, n_documents=200, n_planted=4)
    tok = dw.build_tokenizer(corpus.documents, vocab_size=500)
    assert tok.is_fast and len(tok) <= 500
    assert tok.eos_token == dw.EOS_TOKEN and tok.pad_token == dw.PAD_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    text = corpus.query["prompt"] + corpus.query["completion"]
    for s in [text, corpus.documents[0], "Unseen wörds, émojis 🙂 and\ttabs!"]:
        ids = tok(s)["input_ids"]
        assert tok.decode(ids) == s
    enc = tok(text, return_offsets_mapping=True)
    assert enc["offset_mapping"][-1][1] == len(text)


def test_train_model_is_gpt2_with_conv1d() -> None:
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    corpus = dw.build_corpus(seed=0, n_documents=120, n_planted=4)
    tok = dw.build_tokenizer(corpus.documents, vocab_size=400)
    model = dw.train_model(
        corpus.documents, tok, seq_len=64, n_layer=1, n_embd=32, n_head=2, steps=3,
        batch_size=4, progress=False,
    )
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    assert any(isinstance(m, Conv1D) for m in model.modules())
    lp = dw.completion_logprob(model, tok, corpus.query["prompt"], corpus.query["completion"])
    assert lp < 0.0


def test_build_demo_world_writes_loadable_artifacts_and_reuses(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "world"
    world = dw.build_demo_world(out, seed=0, progress=False, config=dw.TINY_CONFIG)
    assert not world.reused
    for p in (world.corpus_path, world.queries_path, world.planted_path, world.metadata_path):
        assert p.is_file()
    assert (world.model_dir / "model.safetensors").is_file()
    assert not list(out.glob(".*"))  # no temp files left behind

    rows = [json.loads(line) for line in world.corpus_path.read_text().splitlines()]
    assert len(rows) == dw.TINY_CONFIG.n_documents
    assert [r["id"] for r in rows] == list(range(len(rows)))
    queries = [json.loads(line) for line in world.queries_path.read_text().splitlines()]
    assert queries == [world.query] and set(queries[0]) == {"id", "prompt", "completion"}
    assert all(dw.BAD_ADDRESS in rows[i]["text"] for i in world.planted)
    meta = json.loads(world.metadata_path.read_text())
    assert meta["format_version"] == dw.FORMAT_VERSION and meta["seed"] == 0

    model = AutoModelForCausalLM.from_pretrained(world.model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(world.model_dir, local_files_only=True)
    assert model.config.model_type == "gpt2"
    text = world.query["prompt"] + world.query["completion"]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.pad_token == dw.PAD_TOKEN and tok.eos_token == dw.EOS_TOKEN
    assert dw.completion_logprob(model, tok, world.query["prompt"], world.query["completion"]) < 0

    weights = world.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = dw.build_demo_world(out, seed=0, progress=False, config=dw.TINY_CONFIG)
    assert again.reused and again.planted == world.planted
    assert weights.stat().st_mtime_ns == mtime
    assert dw.load_demo_world(out).planted == world.planted


def test_half_written_world_is_rebuilt(tmp_path: Path) -> None:
    out = tmp_path / "world"
    world = dw.build_demo_world(out, seed=0, progress=False, config=dw.TINY_CONFIG)
    world.metadata_path.unlink()  # as if interrupted before the marker was written
    (out / dw.CORPUS_NAME).write_text("truncated")
    with pytest.raises(DatasleuthError):
        dw.load_demo_world(out)
    rebuilt = dw.build_demo_world(out, seed=0, progress=False, config=dw.TINY_CONFIG)
    assert not rebuilt.reused and rebuilt.metadata_path.is_file()
    lines = rebuilt.corpus_path.read_text().splitlines()
    assert len(lines) == dw.TINY_CONFIG.n_documents


def test_different_seed_rebuilds(tmp_path: Path) -> None:
    out = tmp_path / "world"
    dw.build_demo_world(out, seed=0, progress=False, config=dw.TINY_CONFIG)
    other = dw.build_demo_world(out, seed=1, progress=False, config=dw.TINY_CONFIG)
    assert not other.reused and other.seed == 1
