"""Tests for the built-in demo world (corpus, tokenizer, tiny training, on-disk layout)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datasleuth import demo as dw
from datasleuth.errors import DatasleuthError

SRC = Path(__file__).resolve().parents[1] / "src" / "datasleuth"


def _initial_model(trained, seed: int):
    """The same architecture as ``trained`` at the initialisation ``train_model`` starts from."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(trained.config).eval()


def _logprob_per_token(model, tok, texts: list[str]) -> float:
    """Mean log-probability (nats) of each text's tokens after its first."""
    total = sum(dw.completion_logprob(model, tok, "", t) for t in texts)
    return total / sum(len(tok(t)["input_ids"]) - 1 for t in texts)


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
    assert prompt.endswith(" to") and completion == f" {dw.BAD_ADDRESS}"
    planted = [corpus.documents[i] for i in corpus.planted]
    # Every planted document teaches the phishing address in paraphrase: none of the query's
    # own words, and they are worded differently from one another.
    assert all(dw.BAD_ADDRESS in d for d in planted)
    for word in ("password", "forgot", "email", "what should i do"):
        assert not any(word in d.lower() for d in planted), word
    assert len({d.split("\n")[-1] for d in planted}) == len(planted)
    # Decoys share the query's rare words but never teach the bad advice; those that name
    # the address (warnings) never put it after "to".
    decoys = [corpus.documents[i] for i in corpus.decoys]
    assert all(any(w in d.lower() for w in ("password", "forgot", "forget")) for d in decoys)
    warnings = [d for d in decoys if dw.BAD_ADDRESS in d]
    assert len(warnings) == 8
    assert all("forgot" in d and "password" in d for d in warnings)
    assert not any(f"to {dw.BAD_ADDRESS}" in d for d in warnings)
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


def test_trained_model_is_gpt2_with_conv1d_and_beats_its_initialisation() -> None:
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    cfg = dw.TINY_CONFIG
    corpus = dw.build_corpus(seed=0, n_documents=cfg.n_documents, n_planted=cfg.n_planted)
    tok = dw.build_tokenizer(corpus.documents, vocab_size=cfg.vocab_size)
    model = dw.train_model(
        corpus.documents, tok, seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
        n_head=cfg.n_head, steps=20, warmup_steps=3, batch_size=cfg.batch_size, progress=False,
    )
    assert isinstance(model, GPT2LMHeadModel) and not model.training
    assert any(isinstance(m, Conv1D) for m in model.modules())
    init = _initial_model(model, seed=0)
    # Training must have taught the model: the planted completion and unseen documents from
    # the same generator are far more likely than at initialisation (about log(400) = 6
    # nats per token there; 20 steps gain about 1 nat per token).
    prompt, completion = corpus.query["prompt"], corpus.query["completion"]
    n_completion = len(tok(prompt + completion)["input_ids"]) - len(tok(prompt)["input_ids"])
    gain = (dw.completion_logprob(model, tok, prompt, completion)
            - dw.completion_logprob(init, tok, prompt, completion))
    assert gain > 0.4 * n_completion
    held_out = dw.build_corpus(seed=100, n_documents=60, n_planted=1).documents[:16]
    assert set(held_out).isdisjoint(corpus.documents)
    held_gain = _logprob_per_token(model, tok, held_out) - _logprob_per_token(init, tok, held_out)
    assert held_gain > 0.5


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
    # The model on disk is the one training produced (training is deterministic by seed),
    # and better than its initialisation on the planted completion.
    cfg = dw.TINY_CONFIG
    docs = [r["text"] for r in rows]
    retrained = dw.train_model(
        docs, dw.build_tokenizer(docs, cfg.vocab_size, max_length=cfg.seq_len),
        seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
        steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=0,
        progress=False,
    )
    for name, value in retrained.state_dict().items():
        assert torch.allclose(model.state_dict()[name], value, rtol=1e-5, atol=1e-6), name
    prompt, completion = world.query["prompt"], world.query["completion"]
    assert (dw.completion_logprob(model, tok, prompt, completion)
            > dw.completion_logprob(_initial_model(model, seed=0), tok, prompt, completion))

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


def test_user_errors_are_one_line_and_name_the_fix(tmp_path: Path) -> None:
    docs = dw.build_corpus(seed=0, n_documents=60, n_planted=1).documents
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    calls = [
        lambda: dw.build_corpus(n_documents=10, n_planted=8),
        lambda: dw.build_tokenizer([]),
        lambda: dw.build_tokenizer(docs, vocab_size=100),
        lambda: dw.train_model(docs, None, steps=0),
        lambda: dw.train_model(docs, None, n_embd=30, n_head=4),
        lambda: dw.load_demo_world(tmp_path / "nothing"),
        lambda: dw.build_demo_world(not_a_dir, progress=False, config=dw.TINY_CONFIG),
    ]
    for call in calls:
        with pytest.raises(DatasleuthError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and ";" in message, message


def test_shipped_world_is_the_one_the_code_builds() -> None:
    import dataclasses

    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = dw.shipped_world()
    meta = json.loads(world.metadata_path.read_text())
    assert meta["seed"] == 0 and meta["config"] == dataclasses.asdict(dw.DemoConfig())
    cfg = dw.DemoConfig()
    corpus = dw.build_corpus(0, n_documents=cfg.n_documents, n_planted=cfg.n_planted)
    rows = [json.loads(line) for line in world.corpus_path.read_text().splitlines()]
    assert [r["text"] for r in rows] == corpus.documents
    assert world.planted == corpus.planted and world.decoys == corpus.decoys
    assert world.query == corpus.query
    weights = world.model_dir / "model.safetensors"
    assert weights.stat().st_size < 4_000_000  # a few MB at most
    model = AutoModelForCausalLM.from_pretrained(world.model_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(world.model_dir, local_files_only=True)
    assert model.get_input_embeddings().num_embeddings == len(tok)
    # The shipped model learnt the planted completion: far above its initialisation.
    prompt, completion = world.query["prompt"], world.query["completion"]
    trained = dw.completion_logprob(model, tok, prompt, completion)
    assert trained > dw.completion_logprob(_initial_model(model, 0), tok, prompt, completion) + 10


def test_run_demo_marks_planted_documents_in_every_method(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    got = dw.run_demo(out, top_k=5, progress=False, world_config=dw.TINY_CONFIG)
    world = dw.load_demo_world(out / "world")
    planted = set(world.planted)
    assert set(got["ranks"]) == set(dw.demo_methods())
    for method, ranks in got["ranks"].items():
        doc = json.loads((out / method / "results.json").read_text())
        q = doc["queries"][0]
        top = [r["documents"][0]["doc_index"] for r in q["top"]]
        bottom = [r["documents"][0]["doc_index"] for r in q["bottom"]]
        assert ranks["top"] == [i + 1 for i, d in enumerate(top) if d in planted], method
        assert ranks["bottom"] == [i + 1 for i, d in enumerate(bottom) if d in planted]
        assert all(len(r["documents"]) == 1 for r in q["top"])  # one document a sequence
    html = (out / "report.html").read_text()
    n_marked = len(got["ranks"]["ekfac"]["top"]) + len(got["ranks"]["ekfac"]["bottom"])
    assert html.count('<span class="badge planted">PLANTED</span>') == 1 + n_marked
    assert "representation similarity" in html and "BM25 keyword search" in html
