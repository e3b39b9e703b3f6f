"""Queries: a prompt and a completion whose log-probability is the measurement.

METHOD.md §1: the measurement is f(θ) = log p(completion | prompt; θ), summed over the
completion tokens only. A query batch therefore carries labels on the completion
positions and -100 everywhere else (docs/CONTRACT.md).

Encoding rule: the prompt and the completion are tokenised *separately* (without
special tokens) and concatenated, so the boundary between them is exact. If the
tokenizer puts a BOS token in front of text by default (e.g. Llama), that BOS is put
in front of the prompt. A prompt that encodes to no tokens gets the BOS token, or
else the EOS token, as its only context token, so that the first completion token is
still predicted from something. Note that tokenising separately can differ from
tokenising ``prompt + completion`` in one go (e.g. a word split across the boundary);
put the boundary at a space, with the space at the start of the completion, for
byte-level BPE tokenizers such as GPT-2's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datasleuth.errors import DatasleuthError

__all__ = ["Query", "load_queries", "encode_queries", "collate_queries"]


@dataclass(frozen=True)
class Query:
    """One query: the text given to the model and the completion whose probability is measured.

    ``line`` is the 1-based line of the query file it came from (``None`` if built in code).
    """

    prompt: str
    completion: str
    id: str
    line: int | None = None


def load_queries(path: str | os.PathLike) -> list[Query]:
    """Read queries from a JSON Lines file of ``{"prompt", "completion", optional "id"}``.

    Blank lines are skipped. A missing ``id`` becomes the query's 0-based position
    (as a string); ids must be unique.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasleuthError(f"query file {p} does not exist; check the path")
    queries: list[Query] = []
    seen: dict[str, int] = {}
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasleuthError(
                    f"{where}: malformed JSON ({e.msg}); write one object per line like "
                    '{"prompt": "...", "completion": "..."}'
                ) from e
            if not isinstance(obj, dict):
                raise DatasleuthError(
                    f"{where}: expected a JSON object, got {type(obj).__name__}; write one object "
                    'per line like {"prompt": "...", "completion": "..."}'
                )
            for key in ("prompt", "completion"):
                if key not in obj:
                    raise DatasleuthError(
                        f"{where}: the query has no {key!r} key "
                        f"(keys: {', '.join(obj) or 'none'}); "
                        'give every line a "prompt" and a "completion"'
                    )
                if not isinstance(obj[key], str):
                    raise DatasleuthError(
                        f"{where}: {key!r} is {type(obj[key]).__name__}, not a string; quote it "
                        "as a JSON string"
                    )
            if obj["completion"] == "":
                raise DatasleuthError(
                    f"{where}: query on line {lineno} has an empty completion; the measurement "
                    "log p(completion|prompt) needs at least one completion token"
                )
            raw_id = obj.get("id", len(queries))
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                raise DatasleuthError(
                    f"{where}: 'id' is {type(raw_id).__name__}; use a string or an integer"
                )
            qid = str(raw_id)
            if qid in seen:
                raise DatasleuthError(
                    f"{where}: query id {qid!r} is already used on line {seen[qid]}; give every "
                    "query a unique id"
                )
            seen[qid] = lineno
            queries.append(Query(obj["prompt"], obj["completion"], qid, lineno))
    if not queries:
        raise DatasleuthError(
            f"query file {p} holds no queries; add lines like "
            '{"prompt": "...", "completion": "..."}'
        )
    return queries


def _prefix_ids(tokenizer: Any) -> list[int]:
    """The BOS token if the tokenizer adds one in front of text by default, else nothing."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special[:1] == [bos] and plain[:1] != [bos]:
        return [int(bos)]
    return []


def _pieces(tokenizer: Any, text: str, ids: list[int], offsets: list | None) -> list[str]:
    """Each token's text: original characters by offsets where available, else decoded."""
    if offsets is not None and len(offsets) == len(ids):
        starts = [0] + [int(s) for s, _ in offsets[1:]]
        for k in range(1, len(starts)):
            starts[k] = min(max(starts[k], starts[k - 1]), len(text))
        ends = starts[1:] + [len(text)]
        return [text[s:e] for s, e in zip(starts, ends, strict=True)]
    return [tokenizer.decode([t]) for t in ids]


def encode_queries(
    queries: Sequence[Query], tokenizer: Any, max_length: int | None = None
) -> list[dict[str, Any]]:
    """Tokenise queries into 1-D tensors ready for :func:`collate_queries`.

    Each dict has ``input_ids`` and ``labels`` (LongTensor (T,), labels -100 on the
    prompt), ``index`` (position in ``queries``), ``id``, ``prompt_length`` (tokens
    before the completion, BOS included), ``completion_ids``, ``completion_tokens``
    (the text piece of each completion token, for reports) and ``pad_token_id``
    (the tokenizer's pad token, else its EOS token).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DatasleuthError(
            "the tokenizer has neither a pad nor an EOS token to pad query batches with; set "
            "tokenizer.pad_token"
        )
    prefix = _prefix_ids(tokenizer)
    start = prefix or ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else
                       [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    fast = bool(getattr(tokenizer, "is_fast", False))
    out: list[dict[str, Any]] = []
    for index, q in enumerate(queries):
        where = f"query {q.id!r}" + (f" (line {q.line})" if q.line is not None else "")
        prompt_ids = list(tokenizer(q.prompt, add_special_tokens=False)["input_ids"])
        enc = tokenizer(q.completion, add_special_tokens=False, return_offsets_mapping=fast)
        comp_ids = list(enc["input_ids"])
        if not comp_ids:
            raise DatasleuthError(
                f"{where}: the completion {q.completion!r} encodes to zero tokens; the "
                "measurement needs at least one completion token, so give a completion with text"
            )
        head = prefix + prompt_ids
        if not head:
            if not start:
                raise DatasleuthError(
                    f"{where}: the prompt is empty and the tokenizer has no BOS or EOS token to "
                    "condition on; give a non-empty prompt"
                )
            head = [int(start[0])]
        ids = head + comp_ids
        if max_length is not None and len(ids) > max_length:
            raise DatasleuthError(
                f"{where} is {len(ids)} tokens long, more than the {max_length} the model "
                "takes; shorten the prompt or the completion"
            )
        labels = [-100] * len(head) + comp_ids
        out.append({
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "index": index,
            "id": q.id,
            "prompt_length": len(head),
            "completion_ids": comp_ids,
            "completion_tokens": _pieces(tokenizer, q.completion, comp_ids,
                                         enc.get("offset_mapping") if fast else None),
            "pad_token_id": int(pad),
        })
    return out


def collate_queries(
    items: Sequence[dict[str, Any]], pad_token_id: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad encoded queries into a CONTRACT batch dict.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (B, T) and ``index`` (B,);
    padding gets ``pad_token_id`` (default: the one stored by :func:`encode_queries`),
    attention 0 and label -100.
    """
    if len(items) == 0:
        raise DatasleuthError("cannot collate an empty list of queries; pass at least one")
    pad = pad_token_id if pad_token_id is not None else items[0].get("pad_token_id", 0)
    width = max(len(it["input_ids"]) for it in items)
    b = len(items)
    input_ids = torch.full((b, width), int(pad), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[r, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
        labels[r, :n] = torch.as_tensor(it["labels"], dtype=torch.long)
        mask[r, :n] = 1
    index = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "index": index}
