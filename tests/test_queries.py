"""Query files, encoding with exact completion masks, and collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from datasleuth.errors import DatasleuthError
from datasleuth.lm.queries import Query, collate_queries, encode_queries, load_queries

TEXT = ["The capital of France is Paris.", "Two plus two equals four.", "Hello world 😀"]


def _bpe(bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def plain() -> PreTrainedTokenizerFast:
    return _bpe(bos=False)


@pytest.fixture(scope="module")
def with_bos() -> PreTrainedTokenizerFast:
    return _bpe(bos=True)


def _write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_queries(tmp_path: Path) -> None:
    p = _write(tmp_path, [
        json.dumps({"prompt": "The capital of France is", "completion": " Paris", "id": "paris"}),
        "",
        json.dumps({"prompt": "Two plus two equals", "completion": " four"}),
        json.dumps({"prompt": "", "completion": "Hello", "id": 7}),
    ])
    qs = load_queries(p)
    assert [q.id for q in qs] == ["paris", "1", "7"]
    assert [q.line for q in qs] == [1, 3, 4]
    assert qs[0] == Query("The capital of France is", " Paris", "paris", 1)


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "a", "completion": }', r":2: malformed JSON.*one object per line"),
    ('["a", "b"]', r":2: expected a JSON object, got list"),
    ('{"prompt": "a"}', r":2: the query has no 'completion' key \(keys: prompt\).*give every"),
    ('{"completion": "a"}', r":2: the query has no 'prompt' key"),
    ('{"prompt": 3, "completion": "a"}', r":2: 'prompt' is int, not a string; quote it"),
    ('{"prompt": "a", "completion": null}', r":2: 'completion' is NoneType"),
    ('{"prompt": "a", "completion": "", "id": "z"}',
     r":2: the query has an empty completion; the measurement log p\(completion\|prompt\) "
     "needs at least one completion token"),
    ('{"prompt": "a", "completion": "b", "id": "x"}',
     r":2: query id 'x' is already used on line 1"),
    ('{"prompt": "a", "completion": "b", "id": [1]}', r":2: 'id' is list; use a string"),
])
def test_load_queries_errors(tmp_path: Path, line: str, message: str) -> None:
    p = _write(tmp_path, [json.dumps({"prompt": "p", "completion": "c", "id": "x"}), line])
    with pytest.raises(DatasleuthError, match=message) as err:
        load_queries(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_load_queries_empty_and_missing(tmp_path: Path) -> None:
    p = _write(tmp_path, ["", "   "])
    with pytest.raises(DatasleuthError, match="holds no queries; add lines"):
        load_queries(p)
    with pytest.raises(DatasleuthError, match="does not exist"):
        load_queries(tmp_path / "missing.jsonl")


def test_encode_masks_exactly_the_completion(plain) -> None:
    qs = [Query("The capital of France is", " Paris.", "a"), Query("Hello", " world 😀", "b")]
    enc = encode_queries(qs, plain)
    for q, e in zip(qs, enc, strict=True):
        p_ids = plain(q.prompt, add_special_tokens=False)["input_ids"]
        c_ids = plain(q.completion, add_special_tokens=False)["input_ids"]
        assert e["input_ids"].tolist() == p_ids + c_ids
        assert e["labels"].tolist() == [-100] * len(p_ids) + c_ids
        assert e["prompt_length"] == len(p_ids) and e["completion_ids"] == c_ids
        assert "".join(e["completion_tokens"]) == q.completion
        assert len(e["completion_tokens"]) == len(c_ids)
    assert [e["index"] for e in enc] == [0, 1] and enc[0]["id"] == "a"
    assert enc[0]["pad_token_id"] == plain.eos_token_id  # no pad token: EOS pads


def test_bos_and_empty_prompt(plain, with_bos) -> None:
    bos = with_bos.bos_token_id
    e = encode_queries([Query("Two plus", " two", "q")], with_bos)[0]
    p_ids = with_bos("Two plus", add_special_tokens=False)["input_ids"]
    assert e["input_ids"].tolist()[: len(p_ids) + 1] == [bos] + p_ids
    assert e["labels"].tolist()[: len(p_ids) + 1] == [-100] * (len(p_ids) + 1)
    assert e["prompt_length"] == len(p_ids) + 1
    # an empty prompt still gives the first completion token a context token
    e = encode_queries([Query("", "Hello", "q")], plain)[0]
    assert e["input_ids"][0].item() == plain.eos_token_id and e["labels"][0].item() == -100
    assert e["labels"][1:].tolist() == plain("Hello", add_special_tokens=False)["input_ids"]
    e = encode_queries([Query("", "Hello", "q")], with_bos)[0]
    assert e["input_ids"][0].item() == bos


def test_encode_errors() -> None:
    vocab = {"[UNK]": 0, "[PAD]": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(DatasleuthError, match=r"query 'q' \(line 4\): the completion '   ' "
                                              r"encodes to zero tokens"):
        encode_queries([Query("hello", "   ", "q", 4)], words)
    with pytest.raises(DatasleuthError, match=r"3 tokens long, more than the 2 the model takes"):
        encode_queries([Query("hello world", "hello", "q")], words, max_length=2)
    with pytest.raises(DatasleuthError, match="prompt is empty.*non-empty prompt"):
        encode_queries([Query("", "hello", "q")], words)
    enc = encode_queries([Query("hello", "world", "q")], words, max_length=2)
    assert enc[0]["labels"].tolist() == [-100, 3] and enc[0]["pad_token_id"] == 1


def test_collate_pads_right(plain) -> None:
    qs = [Query("The capital of France is", " Paris.", "a"), Query("Hi", " four", "b")]
    enc = encode_queries(qs, plain)
    batch = collate_queries(enc)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}
    lengths = [len(e["input_ids"]) for e in enc]
    width = max(lengths)
    for name in ("input_ids", "attention_mask", "labels"):
        assert batch[name].shape == (2, width) and batch[name].dtype == torch.long
    for r, (e, n) in enumerate(zip(enc, lengths, strict=True)):
        assert batch["input_ids"][r, :n].tolist() == e["input_ids"].tolist()
        assert batch["labels"][r, :n].tolist() == e["labels"].tolist()
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (width - n)
        assert (batch["input_ids"][r, n:] == plain.eos_token_id).all()
        assert (batch["labels"][r, n:] == -100).all()
    assert batch["index"].tolist() == [0, 1]
    # only completion positions carry labels
    counted = (batch["labels"] != -100).sum(dim=1).tolist()
    assert counted == [len(e["completion_ids"]) for e in enc]
    assert collate_queries(enc, pad_token_id=0)["input_ids"][1, -1].item() == 0
    with pytest.raises(DatasleuthError, match="empty list"):
        collate_queries([])
