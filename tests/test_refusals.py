"""What cannot be right is refused in one line before any fitting; --separator, --no-pack."""

from __future__ import annotations

import json
import string

import pytest
import torch
from test_hf_names import TEXTS, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from datasleuth.cli import main
from datasleuth.demo import build_tokenizer
from datasleuth.errors import DatasleuthError
from datasleuth.lm import LoadOptions, load_inputs
from datasleuth.lm.corpus import EOS_MARKER, PackedCorpus, pack_corpus
from datasleuth.lm.model import check_tokenizer, load_model

LETTERS = string.ascii_letters + string.digits + ".,!?"


def char_tokenizer(chars: str, first_id: int = 0) -> PreTrainedTokenizerFast:
    """One token per character of ``chars`` (ids from ``first_id``) and ``<eos>``; any other
    character is dropped (no unknown token)."""
    vocab = {"<eos>": first_id, **{c: first_id + 1 + k for k, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _save(tmp_path, tokenizer, vocab: int, name: str = "model"):
    folder = tmp_path / name
    tiny_model(vocab).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_model_folder_without_a_tokenizer_is_refused(tmp_path, capsys):
    folder = _save(tmp_path, None, 100)
    with pytest.raises(DatasleuthError, match="holds no tokenizer.*--tokenizer"):
        load_model(folder)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    capsys.readouterr()
    code = main(["fit", "--model", str(folder), "--corpus", str(corpus), "--workdir",
                 str(tmp_path / "w"), "--no-progress"])
    assert code == 2 and "holds no tokenizer" in _one_error_line(capsys)
    assert not list((tmp_path / "w").glob("factors-*"))  # refused before any fitting
    tokenizer = build_tokenizer(TEXTS, vocab_size=300)  # ... and --tokenizer is the fix
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    with pytest.raises(DatasleuthError, match="300 tokens but the model's embedding has 100"):
        load_model(folder, tokenizer=tok_dir)
    model, tok = load_model(_save(tmp_path, None, 300, "wide"), tokenizer=tok_dir)
    assert tok.get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize(("tokenizer", "rows", "message"), [
    (lambda: build_tokenizer(TEXTS, vocab_size=300), 120,
     "the tokenizer has 300 tokens but the model's embedding has 120 rows"),
    (lambda: char_tokenizer("#"), 100, "encodes the text 'The quick brown fox.*to no tokens"),
    (lambda: char_tokenizer(LETTERS, first_id=200), 100,
     "maps text to id 2.., outside the model's vocabulary of 100 embedding rows"),
])
def test_a_tokenizer_that_cannot_be_the_models_is_refused(tokenizer, rows, message):
    with pytest.raises(DatasleuthError, match=message) as err:
        check_tokenizer(tiny_model(rows), tokenizer())
    assert "\n" not in str(err.value) and "--tokenizer" in str(err.value)


def test_a_packing_with_almost_no_tokens_is_refused(tmp_path, capsys):
    tok = char_tokenizer(LETTERS)  # no Greek letters: a Greek corpus encodes to (almost) nothing
    check_tokenizer(tiny_model(100), tok)  # the tokenizer itself passes
    greek = ["αβγδε ζηθικ λμνξο " * 20, "πρστυ φχψω " * 30]
    for docs in (greek, [greek[0] + " ab", greek[1]]):
        with pytest.raises(DatasleuthError, match=r"turned \d+ characters of text into \d "
                                                  "tokens.*only separators"):
            pack_corpus(docs, tok, seq_len=8, progress=False)
    assert len(pack_corpus(["ab cd"] + greek[:1], tok, seq_len=8, progress=False)) > 0
    folder = _save(tmp_path, tok, 100)
    corpus = tmp_path / "greek.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in greek))
    capsys.readouterr()
    code = main(["fit", "--model", str(folder), "--corpus", str(corpus), "--seq-len", "8",
                 "--workdir", str(tmp_path / "w"), "--no-progress"])
    assert code == 2 and "only separators" in _one_error_line(capsys)
    assert not list((tmp_path / "w").glob("factors-*"))


def test_separator_option(tmp_path, capsys):
    tok = build_tokenizer(TEXTS, vocab_size=300)
    folder = _save(tmp_path, tok, 300)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    pad = tok.convert_tokens_to_ids("<|pad|>")
    for separator in ("<|pad|>", str(pad), pad):
        inputs = load_inputs(LoadOptions(folder, corpus, workdir=tmp_path / "w", seq_len=8,
                                         separator=separator), progress=False)
        packed = inputs.corpus
        assert packed.metadata["separator_token_id"] == pad
        ids = torch.cat([packed.input_ids(i)[: packed.length(i)] for i in range(len(packed))])
        assert int((ids == pad).sum()) == 4  # after every document
    default = load_inputs(LoadOptions(folder, corpus, workdir=tmp_path / "w", seq_len=8),
                          progress=False)
    assert default.corpus.metadata["separator_token_id"] == tok.eos_token_id
    capsys.readouterr()
    for separator, message in (("<nope>", "'<nope>' is not a token"),
                               ("300", "--separator is token id 300, outside")):
        code = main(["fit", "--model", str(folder), "--corpus", str(corpus), "--seq-len", "8",
                     "--separator", separator, "--workdir", str(tmp_path / "w2"),
                     "--no-progress"])
        assert code == 2 and message in _one_error_line(capsys)


def test_no_pack_keeps_one_document_per_sequence(tmp_path):
    tok = build_tokenizer(TEXTS, vocab_size=300)
    docs = ["the cat sat", "", "a dog ran in the park and the cat sat on the mat", "birds"]
    corpus = pack_corpus(docs, tok, seq_len=6, output_dir=tmp_path / "c", progress=False,
                         pack=False)
    assert len(corpus) == len(docs) == corpus.num_documents
    for i, text in enumerate(docs):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert [s.doc_index for s in corpus.segments(i)] == [i]
        kept = ids[:6] if len(ids) >= 6 else ids + [tok.eos_token_id]
        assert corpus.length(i) == len(kept)
        assert corpus.input_ids(i)[: len(kept)].tolist() == kept
        assert corpus.input_ids(i)[len(kept):].eq(tok.pad_token_id).all()  # padded
        if len(ids) < 6:
            assert corpus.text(i) == text + EOS_MARKER
        else:
            assert text.startswith(corpus.text(i)) and len(corpus.text(i)) < len(text)
    meta = corpus.metadata
    assert meta["packed"] is False and meta["truncated_documents"] == 1
    assert meta["truncated_tokens"] == len(tok(docs[2], add_special_tokens=False)["input_ids"]) - 6
    assert not PackedCorpus.matches(tmp_path / "c", docs, tok, seq_len=6)  # packed: other
    assert PackedCorpus.matches(tmp_path / "c", docs, tok, seq_len=6, pack=False)
    batch = corpus.collate([0, 1])
    assert batch["labels"][1].ne(-100).sum() == 1  # the empty document: its separator only
    torch.testing.assert_close(batch["attention_mask"].sum(1), torch.tensor([
        corpus.length(0), corpus.length(1)]))


def test_no_pack_warns_about_cut_documents(tmp_path, capsys):
    tok = build_tokenizer(TEXTS, vocab_size=300)
    folder = _save(tmp_path, tok, 300)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                              ["the cat sat", " ".join(TEXTS[:3])]))
    capsys.readouterr()
    inputs = load_inputs(LoadOptions(folder, corpus, workdir=tmp_path / "w", seq_len=8,
                                     pack=False), progress=False)
    assert len(inputs.corpus) == 2
    err = capsys.readouterr().err
    assert "(one document each)" in err and "warning: 1 documents are longer than 8" in err


def test_messages_name_a_few_layers_and_count_the_rest():
    from datasleuth.errors import listed

    names = [f"model.layers.0.mlp.experts.down_proj.{e}" for e in range(64)]
    assert listed(names[:2]) == repr(names[0]) + ", " + repr(names[1])
    assert listed(names) == ", ".join(map(repr, names[:3])) + " and 61 more"
    assert listed([]) == ""
