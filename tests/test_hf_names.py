"""Hugging Face conventions: Hub ids and datasets names from local caches made in the test
(no network), chat-transcript queries, in-memory queries and corpora."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datasleuth.demo import build_tokenizer
from datasleuth.errors import DatasleuthError
from datasleuth.lm import LoadOptions, load_inputs
from datasleuth.lm.corpus import load_documents, pack_corpus
from datasleuth.lm.model import load_model
from datasleuth.lm.queries import Query, encode_queries, load_queries, render_chat

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning",
         "the capital of france is paris", "two plus two equals four"] * 3
SHA = "0123456789abcdef0123456789abcdef01234567"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    tok = build_tokenizer(TEXTS, vocab_size=300, max_length=64)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(vocab: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=8, n_layer=1,
                                      n_head=2, bos_token_id=None, eos_token_id=None)).eval()


def hub_snapshot(cache: Path, kind: str, repo_id: str) -> Path:
    """The folder of a Hub snapshot in the cache layout huggingface_hub reads
    (``<kind>s--owner--name/snapshots/<commit>`` and ``refs/main``)."""
    root = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(SHA)
    folder = root / "snapshots" / SHA
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return cache


def test_hub_id_is_read_from_the_local_cache(tokenizer, hub, capsys):
    model = tiny_model(len(tokenizer))
    folder = hub_snapshot(hub, "model", "owner/tiny-lm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    loaded, tok = load_model("owner/tiny-lm")
    assert tok.get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([tokenizer("the cat sat")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(DatasleuthError, match="neither a local folder nor in the Hugging Face cache"
                       r".*pass --download") as err:
        load_model("owner/missing")
    assert "\n" not in str(err.value)
    from datasleuth.cli import main

    capsys.readouterr()
    assert main(["fit", "--model", "owner/missing", "--corpus", "x.jsonl"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "--download" in err_lines[0]


def test_download_is_asked_for_only_with_the_option(tokenizer, hub, monkeypatch):
    import huggingface_hub

    calls = []
    real = huggingface_hub.snapshot_download

    def fake(repo_id, **kwargs):  # the "network": saves the model where the Hub would
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)
        folder = hub_snapshot(Path(kwargs["cache_dir"]), "model", repo_id)
        tiny_model(len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(DatasleuthError, match="--download"):
        load_model("owner/fetched")
    assert calls == [True]
    load_model("owner/fetched", download=True)
    assert calls == [True, True, False]


def _docs_table(split: str, n: int) -> pa.Table:
    return pa.table({"text": [f"{split} {TEXTS[i]}" for i in range(n)],
                     "id": [f"{split}-{i}" for i in range(n)],
                     "title": [f"{split} title {i}" for i in range(n)]})


def test_datasets_name_from_the_hub_cache_with_split(hub):
    folder = hub_snapshot(hub, "dataset", "owner/docs")
    (folder / "data").mkdir()
    pq.write_table(_docs_table("train", 5), folder / "data" / "train-00000-of-00001.parquet")
    pq.write_table(_docs_table("test", 3), folder / "data" / "test-00000-of-00001.parquet")
    ds = load_documents("owner/docs", split="test")
    assert ds["text"] == [f"test {t}" for t in TEXTS[:3]]
    assert ds["id"] == ["test-0", "test-1", "test-2"] and ds["doc_index"] == [0, 1, 2]
    with pytest.raises(DatasleuthError, match=r"several splits \(.*\); pick one with --split"):
        load_documents("owner/docs")
    with pytest.raises(DatasleuthError, match="neither a local file or folder.*--download"):
        load_documents("owner/nothing")
    with pytest.raises(DatasleuthError, match="does not exist"):
        load_documents("missing.jsonl")


def test_datasets_name_from_the_datasets_cache(hub, tmp_path):
    """What an earlier online ``load_dataset("tinydocs")`` leaves in HF_DATASETS_CACHE."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, n in (("train", 4), ("validation", 2)):
        files[split] = [str(tmp_path / f"{split}.parquet")]
        pq.write_table(_docs_table(split, n), files[split][0])
    builder = Parquet(cache_dir=str(tmp_path / "hf-datasets"), dataset_name="tinydocs",
                      config_id="default", hash="0123abcd", data_files=files)
    builder.download_and_prepare()
    ds = load_documents(["tinydocs"], split="validation")
    assert ds["text"] == [f"validation {t}" for t in TEXTS[:2]]
    with pytest.raises(DatasleuthError, match=r"no split 'dev' \(splits: train, validation\)"):
        load_documents("tinydocs", split="dev")


def test_save_to_disk_folder_with_several_splits(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:4]}),
                          "test": datasets.Dataset.from_dict({"text": TEXTS[4:6]})}
                         ).save_to_disk(str(folder))
    assert load_documents(folder, split="test")["text"] == TEXTS[4:6]
    with pytest.raises(DatasleuthError, match="pick one with --split"):
        load_documents(folder)


def test_load_inputs_takes_a_datasets_name_and_an_in_memory_dataset(tokenizer, hub, tmp_path):
    folder = hub_snapshot(hub, "dataset", "owner/docs")
    pq.write_table(_docs_table("train", 6), folder / "train.parquet")
    model_dir = tmp_path / "model"
    tiny_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    named = load_inputs(LoadOptions(model_dir, "owner/docs", workdir=tmp_path / "w1",
                                    seq_len=8), progress=False)
    memory = datasets.Dataset.from_dict(_docs_table("train", 6).to_pydict())
    given = load_inputs(LoadOptions(model_dir, memory, workdir=tmp_path / "w2", seq_len=8),
                        progress=False)
    assert len(named.corpus) == len(given.corpus) > 0
    assert [named.corpus.text(i) for i in range(len(named.corpus))] == \
        [given.corpus.text(i) for i in range(len(given.corpus))]
    assert named.corpus.document_fields(2) == {"id": "train-2", "title": "train title 2"}
    assert given.corpus.document_fields(5)["id"] == "train-5"


def _chat(question: str, answer: str, qid: str) -> dict:
    return {"id": qid, "messages": [{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": question},
                                    {"role": "assistant", "content": answer}]}


def test_chat_query_equals_the_same_text_as_prompt_and_completion(tokenizer):
    chat = load_queries([_chat("what is two plus two?", "four", "c")])
    rendered = render_chat(chat, tokenizer)[0]
    assert rendered.prompt == "system: be brief\nuser: what is two plus two?\nassistant:"
    assert rendered.completion == " four\n"
    plain = Query(rendered.prompt, rendered.completion, "c")
    got, want = encode_queries(chat, tokenizer)[0], encode_queries([plain], tokenizer)[0]
    for key in ("input_ids", "labels"):
        assert torch.equal(got[key], want[key]), key
    assert got["prompt_length"] == want["prompt_length"]
    assert got["completion_tokens"] == want["completion_tokens"]
    # and the tokens are exactly those of the rendered transcript
    whole = tokenizer(rendered.prompt + rendered.completion, add_special_tokens=False)
    assert got["input_ids"].tolist() == whole["input_ids"]


def test_chat_query_token_across_the_boundary_goes_to_the_completion(tokenizer):
    tok = build_tokenizer(TEXTS, vocab_size=300, max_length=64)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    q = load_queries([{"messages": [{"role": "user", "content": "the ca"},
                                    {"role": "assistant", "content": "t sat"}]}])
    enc = encode_queries(q, tok)[0]
    whole = tok("the cat sat", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"].tolist() == whole  # the transcript's own tokens
    assert "".join(enc["completion_tokens"]) == " cat sat"  # " cat" spans "ca|t"
    assert enc["prompt_length"] == 1


def test_chat_queries_are_checked(tokenizer, tmp_path):
    bad = [({"messages": []}, "non-empty list"),
           ({"messages": [{"role": "user", "content": "hi"}]}, "last message must be the "
                                                               "assistant's"),
           ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
            "message 0 is not an object")]
    for obj, message in bad:
        with pytest.raises(DatasleuthError, match=message):
            load_queries([obj])
    plain = build_tokenizer(TEXTS, vocab_size=300)
    plain.chat_template = None
    with pytest.raises(DatasleuthError, match="no chat template"):
        encode_queries(load_queries([_chat("q", "a", "x")]), plain)
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(_chat("what is two plus two?", "four", "c")) + "\n")
    assert load_queries(path)[0].messages == load_queries([_chat("what is two plus two?",
                                                                 "four", "c")])[0].messages


def test_in_memory_queries_equal_the_file(tmp_path):
    rows = [{"prompt": "the cat", "completion": " sat", "id": "a"},
            {"prompt": "a dog", "completion": " ran"}]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_file = [(q.prompt, q.completion, q.id) for q in load_queries(path)]
    for source in (rows, datasets.Dataset.from_list([{**r, "id": r.get("id")} for r in rows]),
                   load_queries(path)):
        assert [(q.prompt, q.completion, q.id) for q in load_queries(source)] == from_file
    with pytest.raises(DatasleuthError, match="already used"):
        load_queries([rows[0], rows[0]])
    with pytest.raises(DatasleuthError, match="queries must be"):
        load_queries(42)


def test_pack_corpus_keeps_the_corpus_columns(tokenizer, tmp_path):
    corpus = pack_corpus([{"text": t, "id": i, "title": f"t{i}"} for i, t in
                          enumerate(TEXTS[:4])], tokenizer, seq_len=8,
                         output_dir=tmp_path / "c", progress=False)
    assert corpus.document_field_names == ["id", "title"]
    assert corpus.document_fields(3) == {"id": "3", "title": "t3"}
