"""Corpus reading and packing: exact round trips, file formats, storage and errors."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from datasleuth.errors import DatasleuthError
from datasleuth.lm.corpus import (
    EOS_MARKER,
    PackedCorpus,
    Segment,
    corpus_fingerprint,
    load_documents,
    pack_corpus,
)

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces and trailing ones.  ",
    "",
    "short",
    "naïve café — déjà vu 😀 twice 😀",
    " ".join(f"word{i % 7} and more text" for i in range(40)),  # several sequences long
    "line one\nline two\n\nline four",
    "x",
]


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """Lossless byte-level BPE tokenizer trained on a few strings."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def words() -> PreTrainedTokenizerFast:
    """Word-level tokenizer whose offsets skip whitespace (no EOS token)."""
    vocab = {"[UNK]": 0, "<sep>": 1}
    for w in ["a", "b", "c", "d", "e", "f", "hello", "world"]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the datasets cache inside the test's temporary directory."""
    d = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", d)
    return d


def _rebuild(corpus: PackedCorpus) -> dict[int, str]:
    out: dict[int, str] = {}
    for i in range(len(corpus)):
        for s in corpus.segments(i):
            out[s.doc_index] = out.get(s.doc_index, "") + corpus.document_text(s.doc_index)[
                s.char_start:s.char_end
            ]
    return out


def _check_exact(corpus: PackedCorpus, docs: list[str], tokenizer, seq_len: int) -> None:
    # segments tile every document exactly, in sequence order
    assert _rebuild(corpus) == dict(enumerate(docs))
    # the real tokens are every document's tokens followed by EOS, in order
    expected: list[int] = []
    for d in docs:
        expected += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    got: list[int] = []
    for i in range(len(corpus)):
        ids = corpus.input_ids(i)
        assert ids.dtype == torch.long and ids.shape == (seq_len,)
        n = corpus.length(i)
        assert (n == seq_len) == (i < len(corpus) - 1) or n == seq_len
        got += ids[:n].tolist()
        assert (ids[n:] == tokenizer.pad_token_id).all()
        for seg in corpus.segments(i):
            piece = corpus.document_text(seg.doc_index)[seg.char_start:seg.char_end]
            assert tokenizer.decode(ids[seg.tok_start:seg.tok_end].tolist()) == piece
        pieces = corpus.token_pieces(i)
        assert len(pieces) == n
        for (piece, _doc, start), tid in zip(pieces, ids[:n].tolist(), strict=True):
            assert (piece == EOS_MARKER) == (tid == tokenizer.eos_token_id)
            assert (start == -1) == (piece == EOS_MARKER)
    assert got == expected
    assert len(corpus) == -(-len(expected) // seq_len)


@pytest.mark.parametrize("seq_len", [7, 16, 1000])
def test_round_trip_is_exact(bpe, seq_len: int) -> None:
    corpus = pack_corpus(DOCS, bpe, seq_len=seq_len, progress=False, batch_size=3)
    _check_exact(corpus, DOCS, bpe, seq_len)
    assert corpus.num_documents == len(DOCS)
    if seq_len == 7:  # the long document spans several sequences, short ones share one
        spans = [i for i in range(len(corpus)) if any(s.doc_index == 5 for s in corpus.segments(i))]
        assert len(spans) > 3
        assert any(len({s.doc_index for s in corpus.segments(i)}) >= 3 for i in range(len(corpus)))
    assert corpus.length(len(corpus) - 1) < seq_len  # does not divide evenly here


def test_token_pieces_concatenate_to_the_text(bpe) -> None:
    corpus = pack_corpus(DOCS, bpe, seq_len=9, progress=False)
    joined = "".join(corpus.text(i) for i in range(len(corpus)))
    assert joined == "".join(d + EOS_MARKER for d in DOCS)
    for i in range(len(corpus)):
        by_doc: dict[int, str] = {}
        for piece, doc, _ in corpus.token_pieces(i):
            if piece != EOS_MARKER:
                by_doc[doc] = by_doc.get(doc, "") + piece
        for seg in corpus.segments(i):
            text = corpus.document_text(seg.doc_index)[seg.char_start:seg.char_end]
            assert by_doc.get(seg.doc_index, "") == text


def test_whitespace_skipping_offsets_still_round_trip(words) -> None:
    docs = ["  hello   world ", "a b\tc", "   ", "d e f a b c d e f a b c hello"]
    with pytest.raises(DatasleuthError, match="separator_token_id"):
        pack_corpus(docs, words, seq_len=4, progress=False)
    corpus = pack_corpus(docs, words, seq_len=4, progress=False, separator_token_id=1)
    assert _rebuild(corpus) == dict(enumerate(docs))
    assert corpus.metadata["pad_token_id"] == 1  # no pad token: the separator pads
    first = corpus.token_pieces(0)
    assert [p for p, _, _ in first[:2]] == ["  hello   ", "world "]


def test_batch_size_does_not_change_the_result(bpe) -> None:
    a = pack_corpus(DOCS * 3, bpe, seq_len=11, progress=False, batch_size=1)
    b = pack_corpus(DOCS * 3, bpe, seq_len=11, progress=False, batch_size=1000)
    assert len(a) == len(b)
    for i in range(len(a)):
        assert torch.equal(a.input_ids(i), b.input_ids(i))
        assert a.segments(i) == b.segments(i)
        assert a.token_pieces(i) == b.token_pieces(i)


def test_save_load_equality_and_files(bpe, tmp_path: Path) -> None:
    out = tmp_path / "packed"
    corpus = pack_corpus(DOCS, bpe, seq_len=10, output_dir=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "documents.arrow", "metadata.json", "offsets.safetensors", "segments.parquet",
        "tokens.safetensors",
    ]
    loaded = PackedCorpus.load(out)
    assert len(loaded) == len(corpus) and loaded.seq_len == 10
    for i in range(len(corpus)):
        assert torch.equal(loaded.input_ids(i), corpus.input_ids(i))
        assert loaded.segments(i) == corpus.segments(i)
        assert loaded.text(i) == corpus.text(i)
    # a standard safetensors reader sees the same int32 matrix and lengths
    with safe_open(str(out / "tokens.safetensors"), framework="pt") as f:
        ids = f.get_tensor("input_ids")
        lengths = f.get_tensor("lengths")
    assert ids.dtype == torch.int32 and ids.shape == (len(corpus), 10)
    assert torch.equal(ids[2].long(), corpus.input_ids(2))
    assert lengths.tolist() == [corpus.length(i) for i in range(len(corpus))]
    seg = pq.read_table(out / "segments.parquet")
    assert seg.column_names == ["sequence", "doc_index", "char_start", "char_end", "tok_start",
                                "tok_end"]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["format_version"] == 1 and meta["num_documents"] == len(DOCS)
    assert meta["tokenizer"]["vocab_size"] == len(bpe)
    assert len(meta["tokenizer"]["vocab_sha256"]) == 64
    # pickling (DataLoader workers) reopens the files instead of copying arrays
    import pickle

    clone = pickle.loads(pickle.dumps(loaded))
    assert torch.equal(clone.input_ids(0), corpus.input_ids(0))
    assert len(pickle.dumps(loaded)) < 2000


def test_matches_and_fingerprint(bpe, tmp_path: Path, cache: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = tmp_path / "packed"
    assert not PackedCorpus.matches(out, src, bpe, seq_len=8)
    corpus = pack_corpus(src, bpe, seq_len=8, output_dir=out, progress=False)
    assert corpus.metadata["source_paths"] == [str(src.resolve())]
    assert PackedCorpus.matches(out, src, bpe, seq_len=8)
    assert PackedCorpus.matches(out, load_documents(src, cache_dir=cache), bpe, seq_len=8)
    assert not PackedCorpus.matches(out, src, bpe, seq_len=9)
    src.write_text(src.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert not PackedCorpus.matches(out, src, bpe, seq_len=8)
    # in-memory documents are fingerprinted by content
    out2 = tmp_path / "mem"
    pack_corpus(DOCS, bpe, seq_len=8, output_dir=out2, progress=False)
    assert PackedCorpus.matches(out2, list(DOCS), bpe, seq_len=8)
    assert not PackedCorpus.matches(out2, DOCS[:-1] + ["y"], bpe, seq_len=8)
    assert corpus_fingerprint(DOCS, bpe, 8) == PackedCorpus.load(out2).fingerprint
    # re-packing into the same directory replaces it cleanly
    again = pack_corpus(DOCS[:2], bpe, seq_len=8, output_dir=out2, progress=False)
    assert again.num_documents == 2 and not list(out2.glob(".*"))


def test_torch_dataset_and_collate(bpe) -> None:
    corpus = pack_corpus(DOCS, bpe, seq_len=12, progress=False)
    ds = corpus.as_torch_dataset()
    assert len(ds) == len(corpus)
    last = len(corpus) - 1
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=corpus.collate)
    batches = list(loader)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(corpus)
    batch = corpus.collate([0, last])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    assert batch["index"].tolist() == [0, last]
    n = corpus.length(last)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (12 - n)
    assert batch["labels"][1, :n].tolist() == batch["input_ids"][1, :n].tolist()
    assert (batch["labels"][1, n:] == -100).all()
    assert torch.equal(batch["labels"][0], batch["input_ids"][0])
    assert torch.equal(corpus.collate([ds[0], ds[last]])["input_ids"], batch["input_ids"])


def _write_formats(tmp: Path, docs: list[str]) -> dict[str, Path]:
    paths = {}
    paths["jsonl"] = tmp / "docs.jsonl"
    paths["jsonl"].write_text("".join(json.dumps({"body": d, "n": i}) + "\n"
                                      for i, d in enumerate(docs)))
    paths["json"] = tmp / "docs.json"
    paths["json"].write_text(json.dumps([{"body": d} for d in docs]))
    table = pa.table({"body": docs, "n": list(range(len(docs)))})
    paths["parquet"] = tmp / "docs.parquet"
    pq.write_table(table, paths["parquet"])
    ds = datasets.Dataset.from_dict({"body": docs})
    paths["disk"] = tmp / "saved"
    ds.save_to_disk(str(paths["disk"]))
    paths["arrow"] = next(paths["disk"].glob("*.arrow"))
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "disk", "arrow"])
@pytest.mark.parametrize("streaming", [False, True])
def test_formats(tmp_path: Path, cache: Path, kind: str, streaming: bool) -> None:
    docs = ["first doc", "second\ndoc ", "third 😀"]
    path = _write_formats(tmp_path, docs)[kind]
    ds = load_documents(path, text_field="body", streaming=streaming, cache_dir=cache)
    rows = list(ds)
    assert [r["text"] for r in rows] == docs
    assert [r["doc_index"] for r in rows] == [0, 1, 2]
    if not streaming:
        assert isinstance(ds, datasets.Dataset) and ds.column_names == ["text", "doc_index"]
    else:
        assert isinstance(ds, datasets.IterableDataset)


def test_text_files_and_directories(tmp_path: Path, cache: Path, bpe) -> None:
    d = tmp_path / "txt"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("second file\nwith two lines\n")
    (d / "a.txt").write_text("first file")
    (d / "sub" / "c.txt").write_text("nested")
    (d / ".hidden.txt").write_text("ignored")
    (d / "notes.md").write_text("ignored too")
    ds = load_documents(d, cache_dir=cache)
    assert ds["text"] == ["first file", "second file\nwith two lines\n", "nested"]
    single = load_documents(d / "b.txt", cache_dir=cache)
    assert single["text"] == ["second file\nwith two lines\n"]
    # several paths of different kinds keep their order in doc_index
    j = tmp_path / "more.jsonl"
    j.write_text(json.dumps({"text": "from json"}) + "\n")
    mixed = load_documents([j, d / "a.txt", j], cache_dir=cache)
    assert mixed["text"] == ["from json", "first file", "from json"]
    assert mixed["doc_index"] == [0, 1, 2]
    corpus = pack_corpus(mixed, bpe, seq_len=5, progress=False)
    assert _rebuild(corpus) == {0: "from json", 1: "first file", 2: "from json"}


def test_custom_doc_index_is_kept(bpe) -> None:
    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta gamma", "delta"],
                                     "doc_index": [10, 3, 42]})
    corpus = pack_corpus(ds, bpe, seq_len=4, progress=False)
    assert corpus.document_text(42) == "delta" and corpus.document_text(3) == "beta gamma"
    assert [s.doc_index for s in corpus.segments(0)][0] == 10
    with pytest.raises(DatasleuthError, match="not in this corpus"):
        corpus.document_text(4)


def test_streaming_documents_pack_like_in_memory(tmp_path: Path, cache: Path, bpe) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    streamed = pack_corpus(load_documents(src, streaming=True, cache_dir=cache), bpe,
                           seq_len=13, progress=False, batch_size=2)
    _check_exact(streamed, DOCS, bpe, 13)


def test_reading_errors(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(DatasleuthError, match="does not exist"):
        load_documents(tmp_path / "nope.jsonl", cache_dir=cache)
    csv = tmp_path / "docs.csv"
    csv.write_text("text\nhi\n")
    with pytest.raises(DatasleuthError, match=r"unknown extension '\.csv'.*\.jsonl"):
        load_documents(csv, cache_dir=cache)
    j = tmp_path / "fields.jsonl"
    j.write_text(json.dumps({"content": "a", "url": "u"}) + "\n")
    fields = r"no field 'text' \(fields: content, url\); pass the right one with --text-field"
    with pytest.raises(DatasleuthError, match=fields):
        load_documents(j, cache_dir=cache)
    with pytest.raises(DatasleuthError, match=fields):
        load_documents(j, streaming=True, cache_dir=cache)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": oops}\n')
    for streaming in (False, True):
        with pytest.raises(DatasleuthError, match=rf"{bad}:3: malformed JSON line.*fix or remove"):
            list(load_documents(bad, streaming=streaming, cache_dir=cache))
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(DatasleuthError, match=rf"{typed}:2: field 'text' is int"):
        load_documents(typed, cache_dir=cache)
    empty = tmp_path / "empty.jsonl"
    for blank in ("", "\n\n  \n"):  # blank lines only: no documents either
        empty.write_text(blank)
        with pytest.raises(DatasleuthError, match="is empty; add documents"):
            load_documents(empty, cache_dir=cache)
    empty_pq = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty_pq)
    with pytest.raises(DatasleuthError, match="holds no documents; add documents"):
        load_documents(empty_pq, cache_dir=cache)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), nulls)
    with pytest.raises(DatasleuthError, match=r"document 1 .*null"):
        load_documents(nulls, cache_dir=cache)
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    with pytest.raises(DatasleuthError, match="holds no .jsonl"):
        load_documents(nothing, cache_dir=cache)


def test_packing_errors(bpe, tmp_path: Path) -> None:
    with pytest.raises(DatasleuthError, match="no documents"):
        pack_corpus([], bpe, seq_len=4, progress=False)
    with pytest.raises(DatasleuthError, match="document 1 has no text"):
        pack_corpus([{"text": "fine"}, {"text": None}], bpe, seq_len=4, progress=False)
    with pytest.raises(DatasleuthError, match="document 1 is a int; pass strings"):
        pack_corpus(["fine", 3], bpe, seq_len=4, progress=False)
    with pytest.raises(DatasleuthError, match="every document of the corpus is empty or blank"):
        pack_corpus(["", "  \n", ""], bpe, seq_len=4, progress=False)  # wrong column, say
    with pytest.raises(DatasleuthError, match="seq_len"):
        pack_corpus(["fine"], bpe, seq_len=0, progress=False)
    with pytest.raises(DatasleuthError, match="not a packed corpus.*pack"):
        PackedCorpus.load(tmp_path)
    out = tmp_path / "p"
    pack_corpus(["fine"], bpe, seq_len=4, output_dir=out, progress=False)
    meta = json.loads((out / "metadata.json").read_text())
    meta["format_version"] = 99
    (out / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DatasleuthError, match="re-pack"):
        PackedCorpus.load(out)
    corpus = pack_corpus(["fine"], bpe, seq_len=4, progress=False)
    with pytest.raises(IndexError):
        corpus.input_ids(len(corpus))
    assert corpus.segments(-1) == [Segment(0, 0, 4, 0, corpus.length(0) - 1)]
    assert np.all(corpus.input_ids(0).numpy()[corpus.length(0):] == bpe.pad_token_id)
