"""Queries: a prompt and a completion whose log-probability is the measurement.

docs/method.md §1: the measurement is f(θ) = log p(completion | prompt; θ), summed over the
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

Chat transcripts (``{"messages": [...]}``) are rendered with the tokenizer's chat
template (:func:`render_chat`): the prompt is everything before the last assistant turn
(with the generation prompt), the completion that turn. They are tokenised as *one*
text -- exactly the tokens the rendered transcript has -- and split where the prompt's
characters end (a token spanning that point counts to the completion); no BOS is
added, the template writes its own. Queries may come from a file, a list of dicts or
:class:`Query` objects, or a ``datasets.Dataset`` (:func:`load_queries`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datasleuth.errors import DatasleuthError
from datasleuth.lm.corpus.textfiles import json_lines

__all__ = ["Query", "load_queries", "render_chat", "encode_queries", "collate_queries"]


@dataclass(frozen=True)
class Query:
    """One query: the text given to the model and the completion whose probability is measured.

    ``line`` is the 1-based line of the query file it came from (``None`` if built in code).
    ``messages`` is the chat transcript of a chat query (``None`` otherwise): its
    ``prompt`` and ``completion`` are then the transcript rendered with the tokenizer's
    chat template (:func:`render_chat`), everything before the last assistant turn and
    that turn.
    """

    prompt: str
    completion: str
    id: str
    line: int | None = None
    messages: tuple[dict[str, Any], ...] | None = None


_SHAPE = ('like {"prompt": "...", "completion": "..."} or {"messages": [{"role": ..., '
          '"content": ...}, ...]}')


def load_queries(source: Any) -> list[Query]:
    """Queries from a JSON Lines file, a list of dicts or :class:`Query` objects, or a
    ``datasets.Dataset`` (rows as dicts).

    A query is ``{"prompt", "completion", optional "id"}`` or a chat transcript
    ``{"messages": [{"role", "content"}, ...], optional "id"}`` whose last message is
    the assistant's (rendered later, with the tokenizer, by :func:`render_chat`). Blank
    lines are skipped. A missing ``id`` becomes the query's 0-based position (as a
    string); ids must be unique.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source))
    if isinstance(source, Mapping) or not _iterable(source):
        raise DatasleuthError(f"queries must be a JSON Lines path, a list of dicts or Query "
                              f"objects, or a datasets.Dataset; got {type(source).__name__}")
    queries: list[Query] = []
    seen: dict[str, str] = {}
    for pos, item in enumerate(source):
        where = f"query {pos}"
        if isinstance(item, Query):
            q = Query(item.prompt, item.completion, item.id, item.line, item.messages)
            _check_query(q, where)
        elif isinstance(item, Mapping):
            q = _from_dict(item, where, len(queries), None)
        else:
            raise DatasleuthError(f"{where} is a {type(item).__name__}; give dicts {_SHAPE} or "
                                  "Query objects")
        _unique(q.id, where, seen, f"by {where}")
        queries.append(q)
    if not queries:
        raise DatasleuthError(f"no queries given; pass at least one, {_SHAPE}")
    return queries


def _iterable(source: Any) -> bool:
    return hasattr(source, "__iter__") and not isinstance(source, (bytes, str))


def _unique(qid: str, where: str, seen: dict[str, str], label: str) -> None:
    if qid in seen:
        raise DatasleuthError(f"{where}: query id {qid!r} is already used {seen[qid]}; give "
                              "every query a unique id")
    seen[qid] = label


def _load_file(p: Path) -> list[Query]:
    """Queries of a JSON Lines file."""
    if not p.is_file():
        raise DatasleuthError(f"query file {p} does not exist; check the path")
    queries: list[Query] = []
    seen: dict[str, str] = {}
    for lineno, obj in json_lines(p, f"write one object per line {_SHAPE}"):
        where = f"{p}:{lineno}"
        if not isinstance(obj, dict):
            raise DatasleuthError(f"{where}: expected a JSON object, got "
                                  f"{type(obj).__name__}; write one object per line {_SHAPE}")
        q = _from_dict(obj, where, len(queries), lineno)
        _unique(q.id, where, seen, f"on line {lineno}")
        queries.append(q)
    if not queries:
        raise DatasleuthError(f"query file {p} holds no queries; add lines {_SHAPE}")
    return queries


def _from_dict(obj: Mapping[str, Any], where: str, position: int, line: int | None) -> Query:
    """A :class:`Query` from one dict (a plain query or a chat transcript), checked."""
    raw_id = obj.get("id", position)
    if raw_id is None:
        raw_id = position
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise DatasleuthError(f"{where}: 'id' is {type(raw_id).__name__}; use a string or an "
                              "integer")
    if obj.get("messages") is not None and "prompt" not in obj:
        messages = _check_messages(obj["messages"], where)
        return Query("", "", str(raw_id), line, messages)
    for key in ("prompt", "completion"):
        if key not in obj:
            raise DatasleuthError(
                f"{where}: the query has no {key!r} key (keys: {', '.join(obj) or 'none'}); "
                f"give every query a \"prompt\" and a \"completion\", or \"messages\""
            )
    q = Query(obj["prompt"], obj["completion"], str(raw_id), line)
    _check_query(q, where)
    return q


def _check_query(q: Query, where: str) -> None:
    if q.messages is not None:
        _check_messages(list(q.messages), where)
        return
    for key, value in (("prompt", q.prompt), ("completion", q.completion)):
        if not isinstance(value, str):
            raise DatasleuthError(f"{where}: {key!r} is {type(value).__name__}, not a string; "
                                  "quote it as a JSON string")
    if q.completion == "":
        raise DatasleuthError(
            f"{where}: the query has an empty completion; the measurement "
            "log p(completion|prompt) needs at least one completion token"
        )


def _check_messages(messages: Any, where: str) -> tuple[dict[str, Any], ...]:
    """A chat transcript: role/content dicts, the last one the assistant's, non-empty."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DatasleuthError(f"{where}: 'messages' must be a non-empty list of "
                              '{"role": ..., "content": ...} objects')
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise DatasleuthError(f"{where}: message {k} is not an object with string 'role' "
                                  "and 'content'; write {\"role\": \"user\", \"content\": "
                                  "\"...\"}")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise DatasleuthError(f"{where}: the last message must be the assistant's, with text: "
                              "its content is the completion whose probability is measured")
    return tuple(dict(m) for m in messages)


def render_chat(queries: Sequence[Query], tokenizer: Any) -> list[Query]:
    """Chat queries with ``prompt``/``completion`` rendered by the tokenizer's chat template.

    The prompt is the transcript before the last (assistant) message rendered with the
    generation prompt (``add_generation_prompt=True``); the completion is the rest of
    the rendered whole transcript (the assistant's text and the template's end-of-turn
    markup). Other queries are returned unchanged.
    """
    out = []
    for q in queries:
        if q.messages is None:
            out.append(q)
            continue
        where = f"query {q.id!r}" + (f" (line {q.line})" if q.line is not None else "")
        if not getattr(tokenizer, "chat_template", None):
            raise DatasleuthError(f"{where} is a chat transcript but the tokenizer has no chat "
                                  "template; set tokenizer.chat_template or give a prompt and "
                                  "a completion")
        history = [dict(m) for m in q.messages]
        full = tokenizer.apply_chat_template(history, tokenize=False)
        prompt = tokenizer.apply_chat_template(history[:-1], tokenize=False,
                                               add_generation_prompt=True)
        if not full.startswith(prompt) or len(full) == len(prompt):
            raise DatasleuthError(f"{where}: the chat template does not render the transcript "
                                  "as its prompt followed by the last assistant turn; give the "
                                  "rendered prompt and completion instead")
        out.append(Query(prompt, full[len(prompt):], q.id, q.line, q.messages))
    return out


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
    out: list[dict[str, Any]] = []
    for index, q in enumerate(queries):
        where = f"query {q.id!r}" + (f" (line {q.line})" if q.line is not None else "")
        if q.messages is None:
            head, comp_ids, pieces = _encode_plain(tokenizer, q, prefix)
        else:
            head, comp_ids, pieces = _encode_chat(tokenizer, q, where)
        if not comp_ids:
            raise DatasleuthError(
                f"{where}: the completion {q.completion!r} encodes to zero tokens; the "
                "measurement needs at least one completion token, so give a completion with text"
            )
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
            "completion_tokens": pieces,
            "pad_token_id": int(pad),
        })
    return out


def _encode_plain(tokenizer: Any, q: Query, prefix: list[int]
                  ) -> tuple[list[int], list[int], list[str]]:
    """(prompt ids with the tokenizer's BOS, completion ids, completion pieces), tokenised
    separately so that the boundary is exact."""
    fast = bool(getattr(tokenizer, "is_fast", False))
    prompt_ids = list(tokenizer(q.prompt, add_special_tokens=False)["input_ids"])
    enc = tokenizer(q.completion, add_special_tokens=False, return_offsets_mapping=fast)
    comp_ids = list(enc["input_ids"])
    pieces = _pieces(tokenizer, q.completion, comp_ids,
                     enc.get("offset_mapping") if fast else None)
    return prefix + prompt_ids, comp_ids, pieces


def _encode_chat(tokenizer: Any, q: Query, where: str
                 ) -> tuple[list[int], list[int], list[str]]:
    """(prompt ids, completion ids, completion pieces) of a chat query: the rendered
    transcript tokenised as one text, as the model reads it (no BOS is added: the chat
    template writes its own), split where the prompt's text ends. A token that spans
    that point belongs to the completion."""
    if not q.prompt and not q.completion:
        q = render_chat([q], tokenizer)[0]
    text, boundary = q.prompt + q.completion, len(q.prompt)
    if not getattr(tokenizer, "is_fast", False):
        prompt_ids = list(tokenizer(q.prompt, add_special_tokens=False)["input_ids"])
        comp_ids = list(tokenizer(q.completion, add_special_tokens=False)["input_ids"])
        if prompt_ids + comp_ids != list(tokenizer(text, add_special_tokens=False)["input_ids"]):
            raise DatasleuthError(f"{where}: the rendered prompt and completion tokenise "
                                  "differently apart than together; load a fast tokenizer "
                                  "(use_fast=True) so the transcript can be split by offsets")
        return prompt_ids, comp_ids, [tokenizer.decode([t]) for t in comp_ids]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    k = next((t for t, (_, end) in enumerate(offsets) if end > boundary), len(ids))
    pieces = _pieces(tokenizer, text, ids, offsets)[k:]
    return ids[:k], ids[k:], pieces


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
