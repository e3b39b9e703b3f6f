"""Identity of a packing: tokenizer hash, source or content hash, and the fingerprint.

A fingerprint names exactly what :func:`~datasleuth.lm.corpus.pack_corpus` produces from
its inputs, so a work folder packed earlier is reused only when nothing changed.
Changing how any of these hashes is computed invalidates every existing work folder.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasleuth.errors import DatasleuthError
from datasleuth.lm.corpus.layout import CORPUS_FORMAT_VERSION
from datasleuth.lm.corpus.readers import (
    SOURCES_ATTR,
    expand_paths,
    has_names,
    is_paths,
    iter_batches,
    load_documents,
)
from datasleuth.lm.corpus.textfiles import file_digest

__all__ = ["corpus_fingerprint", "tokenizer_info"]


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Name, class, vocabulary size and a hash of the vocabulary and pipeline of a tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    vocab_hash = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    pipeline = ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # normalise the JSON so key order never changes the hash
        pipeline = json.dumps(json.loads(backend.to_str()), sort_keys=True)
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or ""),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": vocab_hash,
        "pipeline_sha256": hashlib.sha256(pipeline.encode()).hexdigest(),
    }


def separator_id(tokenizer: Any, separator_token_id: int | None) -> int:
    """The token put after every document: ``separator_token_id``, else the EOS token."""
    if separator_token_id is not None:
        return int(separator_token_id)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DatasleuthError(
            "the tokenizer has no EOS token to put between documents; name one with "
            "--separator TOKEN (separator_token_id= in Python)"
        )
    return int(eos)


class ContentHash:
    """SHA-256 over ``(doc_index, text)`` pairs, fed in corpus order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, doc_index: int, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self._h.update(struct.pack("<qq", doc_index, len(data)))
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def key(self) -> str:
        """Source key of documents identified by their text."""
        return "content:" + self.hexdigest()


def source_key(sources: Sequence[str]) -> str:
    """Source key of corpus files (or saved-dataset folders): their paths and the hash of
    their content, so a file edited in place is packed again even when its size and
    modification time are unchanged."""
    h = hashlib.sha256()
    for s in sources:
        p = Path(s)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f"{s}|{f.relative_to(p) if p.is_dir() else ''}|{file_digest(f)}\n"
                     .encode())
    return "files:" + h.hexdigest()


def fingerprint(source: str, info: dict, seq_len: int, separator: int, text_field: str,
                pack: bool = True) -> str:
    """32 hex digits naming a packing of ``source`` (a source key) with these settings
    (``pack=False``: one document per sequence)."""
    settings = {"format": CORPUS_FORMAT_VERSION, "source": source, "seq_len": seq_len,
                "separator": separator, "text_field": text_field,
                "tokenizer": [info["vocab_sha256"], info["pipeline_sha256"], info["class"]]}
    if not pack:  # packed corpora keep the fingerprints they always had
        settings["pack"] = False
    payload = json.dumps(settings, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def corpus_fingerprint(
    documents: Any,
    tokenizer: Any,
    seq_len: int = 512,
    separator_token_id: int | None = None,
    text_field: str = "text",
    pack: bool = True,
) -> str:
    """Fingerprint of what :func:`pack_corpus` would produce from these inputs.

    For paths (or a dataset straight from :func:`load_documents`) it hashes file paths
    and file content (BLAKE2b over the bytes, :func:`source_key`); for any other
    documents it hashes their text. Either is one cheap pass, no tokenisation.
    """
    separator = separator_id(tokenizer, separator_token_id)
    info = tokenizer_info(tokenizer)
    if is_paths(documents) and has_names(documents):  # datasets names or objects: read them
        documents = load_documents(documents, text_field=text_field)
    if is_paths(documents):
        groups = expand_paths(documents)
        key = source_key([str(f.resolve()) for _, fs in groups for f in fs])
    elif getattr(documents, SOURCES_ATTR, None) is not None:
        key = source_key(getattr(documents, SOURCES_ATTR))
    else:
        h = ContentHash()
        for batch in iter_batches(documents, text_field, 1000):
            for idx, text in batch:
                h.update(idx, text)
        key = h.key()
    return fingerprint(key, info, seq_len, separator, text_field, pack)
