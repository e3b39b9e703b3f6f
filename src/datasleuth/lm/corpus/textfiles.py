"""Corpus and query files read line by line: invalid UTF-8 and JSON named with file and
line; files hashed by content in bounded memory."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from datasleuth.errors import DatasleuthError

__all__ = ["file_digest", "json_lines", "scan_text", "utf8_lines"]

#: Bytes read at a time when hashing corpus files.
_HASH_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b (128-bit) of a file's bytes, streamed in 1 MiB pieces (bounded memory; runs
    at disk speed, about 1 GB/s on one core)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def utf8_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a file; invalid UTF-8 is refused naming the
    file, the line and the byte."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasleuthError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                    f"{e.start + 1} of the line); re-save the file as UTF-8"
                ) from None


def json_lines(path: str | os.PathLike, fix: str, what: str = "JSON"
               ) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON Lines file; invalid UTF-8 or
    JSON is refused naming the file and line, and ``fix``."""
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasleuthError(f"{path}:{lineno}: malformed {what} ({e.msg}); {fix}") from e


def scan_text(files: Sequence[Path]) -> None:
    """Refuse the first line of these text files that is not valid UTF-8."""
    for f in files:
        for _ in utf8_lines(f):
            pass
