"""The demo world on disk: build it once, reuse it, open it.

:func:`build_demo_world` saves the corpus, tokenizer and trained model the way a user's model
and data would be given to the tool (``model/`` via ``save_pretrained``, ``corpus.jsonl``,
``queries.jsonl``), plus ``planted.json`` with the ground truth, and a final ``world.json``
marker so a finished world is reused and a half-written one is rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasleuth.demo.documents import DemoCorpus, build_corpus
from datasleuth.demo.tokenizer import build_tokenizer
from datasleuth.demo.training import train_model
from datasleuth.errors import DatasleuthError
from datasleuth.storage import atomic_path, write_json

__all__ = [
    "FORMAT_VERSION", "MARKER_NAME", "MODEL_DIR_NAME", "CORPUS_NAME", "QUERIES_NAME",
    "PLANTED_NAME", "DemoConfig", "TINY_CONFIG", "DemoWorld", "build_demo_world",
    "load_demo_world",
]

FORMAT_VERSION = 1
"""Version of the on-disk layout written by :func:`build_demo_world`."""

MARKER_NAME = "world.json"
MODEL_DIR_NAME = "model"
CORPUS_NAME = "corpus.jsonl"
QUERIES_NAME = "queries.jsonl"
PLANTED_NAME = "planted.json"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo world (the shipped one uses the defaults; they train in about two
    minutes on two CPU cores)."""

    n_documents: int = 600
    n_planted: int = 8
    vocab_size: int = 1500
    seq_len: int = 128
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 6e-3


TINY_CONFIG = DemoConfig(
    n_documents=120, n_planted=4, vocab_size=400, seq_len=64, n_layer=1, n_embd=32, n_head=2,
    steps=4, batch_size=4,
)
"""A world that builds in about a second, for tests."""


@dataclass
class DemoWorld:
    """Paths of a finished demo world and its ground truth."""

    root: Path
    model_dir: Path
    corpus_path: Path
    queries_path: Path
    planted_path: Path
    metadata_path: Path
    planted: list[int]
    decoys: list[int]
    query: dict[str, str]
    description: str
    seed: int
    reused: bool = False
    """True when :func:`build_demo_world` found this world finished and did no work."""


def _versions() -> dict[str, str]:
    """Installed versions of the packages that shape the world's bytes."""
    from importlib import metadata

    out = {}
    for dist in ("datasleuth", "torch", "transformers", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _world_from_marker(root: Path, meta: dict[str, Any], reused: bool) -> DemoWorld:
    """The :class:`DemoWorld` in ``root``, given its parsed ``world.json``."""
    planted = json.loads((root / PLANTED_NAME).read_text(encoding="utf-8"))
    return DemoWorld(
        root=root,
        model_dir=root / MODEL_DIR_NAME,
        corpus_path=root / CORPUS_NAME,
        queries_path=root / QUERIES_NAME,
        planted_path=root / PLANTED_NAME,
        metadata_path=root / MARKER_NAME,
        planted=list(planted["planted"]),
        decoys=list(planted.get("decoys", [])),
        query=dict(planted["query"]),
        description=str(planted["description"]),
        seed=int(meta["seed"]),
        reused=reused,
    )


def _read_marker(root: Path) -> dict[str, Any] | None:
    """The parsed ``world.json`` in ``root``, or None when it is missing or unreadable."""
    try:
        meta = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def load_demo_world(out_dir: str | os.PathLike[str]) -> DemoWorld:
    """Open a finished demo world written by :func:`build_demo_world`."""
    root = Path(out_dir)
    meta = _read_marker(root)
    if meta is None or meta.get("format_version") != FORMAT_VERSION:
        raise DatasleuthError(
            f"{root} holds no finished demo world; build it with `datasleuth demo` "
            f"(build_demo_world)"
        )
    return _world_from_marker(root, meta, reused=True)


def _is_finished(root: Path, meta: dict[str, Any] | None, seed: int, cfg: DemoConfig) -> bool:
    """Whether ``root`` holds a complete world built from ``seed`` and ``cfg``."""
    if meta is None:
        return False
    if meta.get("format_version") != FORMAT_VERSION or meta.get("seed") != seed:
        return False
    if meta.get("config") != dataclasses.asdict(cfg):
        return False
    needed = [CORPUS_NAME, QUERIES_NAME, PLANTED_NAME, f"{MODEL_DIR_NAME}/config.json"]
    return all((root / name).is_file() for name in needed)


def _save_model(root: Path, model: Any, tokenizer: Any, progress: bool) -> None:
    """Save model and tokenizer into a staging folder, then swap it in as ``model/``."""
    from transformers.utils import logging as hf_logging

    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{MODEL_DIR_NAME}."))
    bars = hf_logging.is_progress_bar_enabled()
    try:
        staging.chmod(0o755)
        if not progress:
            hf_logging.disable_progress_bar()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        final = root / MODEL_DIR_NAME
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write one JSON object per line (UTF-8, unescaped), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )


def _title(text: str, width: int = 60) -> str:
    """A document's title: its first line, cut at a word boundary to ``width`` characters."""
    line = text.split("\n", 1)[0].strip()
    if len(line) <= width:
        return line
    return line[:width].rsplit(" ", 1)[0] + " …"


def _write_data(root: Path, corpus: DemoCorpus) -> None:
    """Write ``corpus.jsonl``, ``queries.jsonl`` and the ground truth ``planted.json``."""
    _write_jsonl(root / CORPUS_NAME, [{"id": i, "title": _title(t), "text": t}
                                      for i, t in enumerate(corpus.documents)])
    _write_jsonl(root / QUERIES_NAME, [corpus.query])
    write_json(root / PLANTED_NAME, {
        "planted": corpus.planted,
        "decoys": corpus.decoys,
        "query": corpus.query,
        "description": corpus.description,
    })


def _train(
    corpus: DemoCorpus, tokenizer: Any, cfg: DemoConfig, seed: int, progress: bool
) -> tuple[Any, float]:
    """Train the model on ``corpus``; return it and the seconds training took."""
    t0 = time.perf_counter()
    model = train_model(
        corpus.documents, tokenizer, seq_len=cfg.seq_len, n_layer=cfg.n_layer,
        n_embd=cfg.n_embd, n_head=cfg.n_head, steps=cfg.steps, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, seed=seed, progress=progress,
    )
    return model, time.perf_counter() - t0


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """A ``print`` that prints nothing."""


def build_demo_world(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    progress: bool = True,
    config: DemoConfig | None = None,
    *,
    force: bool = False,
) -> DemoWorld:
    """Build (or reuse) the demo world in ``out_dir`` and return its paths and ground truth.

    Layout: ``model/`` (model and tokenizer via ``save_pretrained``, safetensors),
    ``corpus.jsonl`` (``{"id", "title", "text"}`` per line, ``id`` = line index, ``title``
    = the first line), ``queries.jsonl``
    (``{"id", "prompt", "completion"}``), ``planted.json`` (planted and decoy indices, the
    query, the description) and, written last, ``world.json`` (seed, config, versions,
    format version, training time). A world whose ``world.json`` matches ``seed`` and
    ``config`` is reused without work; anything else (e.g. a half-written world) is rebuilt.
    Every file is replaced atomically.
    """
    cfg = config or DemoConfig()
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise DatasleuthError(f"{root} is a file; pass a directory for the demo world")
    root.mkdir(parents=True, exist_ok=True)
    meta = _read_marker(root)
    if not force and _is_finished(root, meta, seed, cfg):
        return _world_from_marker(root, meta, reused=True)

    # Invalidate first, so an interrupted rebuild is never mistaken for a finished world.
    (root / MARKER_NAME).unlink(missing_ok=True)
    log: Callable[..., None] = print if progress else _quiet
    corpus = build_corpus(seed, n_documents=cfg.n_documents, n_planted=cfg.n_planted)
    log(f"demo world: {len(corpus.documents)} documents, {len(corpus.planted)} planted")
    tokenizer = build_tokenizer(corpus.documents, cfg.vocab_size, max_length=cfg.seq_len)
    model, train_seconds = _train(corpus, tokenizer, cfg, seed, progress)
    log(f"demo world: trained the model in {train_seconds:.1f} s")
    _save_model(root, model, tokenizer, progress)
    _write_data(root, corpus)
    meta = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "config": dataclasses.asdict(cfg),
        "versions": _versions(),
        "train_seconds": round(train_seconds, 2),
        "n_documents": len(corpus.documents),
        "n_planted": len(corpus.planted),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(root / MARKER_NAME, meta)
    return _world_from_marker(root, meta, reused=False)
