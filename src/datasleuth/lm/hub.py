"""Hugging Face names: Hub model ids and ``datasets`` names, resolved from the local caches.

Nothing is fetched unless the caller opts in (``download=True``, the ``--download``
option): a Hub id is looked up in the Hugging Face cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``), a ``datasets`` name in the ``datasets`` cache (``HF_DATASETS_CACHE``,
else ``HF_HOME/datasets``: what an earlier ``load_dataset`` left there) and then in the
Hub cache (what ``huggingface-cli download`` or ``snapshot_download`` left there). The
environment is read at call time, so a cache chosen after import is the one searched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datasleuth.errors import DatasleuthError

__all__ = ["hub_cache", "datasets_cache", "looks_like_hub_id", "resolve_model_path",
           "load_hub_dataset", "one_split"]

# "name" or "owner/name": letters, digits, "-", "_", "." (Hub repo-id rules, no "..").
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
# Weights for other frameworks are never needed here.
_SKIP_FILES = ["*.onnx", "onnx/*", "*.msgpack", "*.h5", "*.ot", "*.gguf", "*.tflite",
               "*.mlmodel", "coreml/*", "openvino/*"]


def _hf_home() -> Path:
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface"


def hub_cache() -> Path:
    """The Hugging Face Hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(env).expanduser() if env else _hf_home() / "hub"


def datasets_cache() -> Path:
    """The ``datasets`` cache: ``HF_DATASETS_CACHE``, else ``HF_HOME/datasets``."""
    env = os.environ.get("HF_DATASETS_CACHE")
    return Path(env).expanduser() if env else _hf_home() / "datasets"


def looks_like_hub_id(name: str) -> bool:
    """True for ``name`` or ``owner/name`` in Hub spelling (no path separators beyond one)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith(".")


def _snapshot(repo_id: str, repo_type: str, download: bool) -> Path | None:
    """The cached snapshot folder of a Hub repo (fetched first with ``download``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = str(hub_cache())
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache,
                                      local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        if not download:
            return None
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache,
                                      ignore_patterns=_SKIP_FILES))
    except Exception as e:  # network, authentication, missing repo: one line either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasleuthError(f"cannot download {repo_id} from the Hugging Face Hub "
                              f"({first}); check the name and your network or login") from e


def resolve_model_path(name: str | os.PathLike[str], *, download: bool = False,
                       what: str = "model", option: str = "--model") -> Path:
    """A local folder for ``name``: the folder itself, or a Hub id's cached snapshot.

    With ``download`` a Hub id missing from the cache is fetched (all files but other
    frameworks' weights); without it that is refused in one line naming ``--download``.
    """
    path = Path(name)
    if path.is_dir():
        return path
    text = os.fspath(name)
    if path.exists():
        raise DatasleuthError(f"{what} {text} is a file; give the folder of a Hugging Face "
                              f"checkpoint (with config.json) or a Hub id to {option}")
    if not looks_like_hub_id(text):
        raise DatasleuthError(f"{what} folder {text} does not exist; give a local folder of a "
                              "Hugging Face checkpoint (with config.json) or a Hub id such as "
                              "owner/name")
    snapshot = _snapshot(text, "model", download)
    if snapshot is None:
        raise DatasleuthError(f"{what} {text} is neither a local folder nor in the Hugging Face "
                              f"cache {hub_cache()}; pass --download to fetch it from the Hub, "
                              "or give a local folder")
    return snapshot


@contextmanager
def _offline() -> Iterator[None]:
    """Hub look-ups of ``datasets`` and ``huggingface_hub`` fail at once (no retries)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def one_split(data: Any, split: str | None, where: str) -> Any:
    """The split ``split`` of a ``DatasetDict`` (its only split, or ``train``, if none named)."""
    import datasets

    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return data
    names = list(data)
    if split is None:
        if len(names) == 1:
            return data[names[0]]
        raise DatasleuthError(f"{where} holds several splits ({', '.join(names)}); pick one "
                              "with --split (split= in Python)")
    if split not in data:
        raise DatasleuthError(f"{where} has no split {split!r} (splits: {', '.join(names)}); "
                              "pick one of those with --split")
    return data[split]


def _load(path: str, config: str | None, split: str | None, streaming: bool, cache: str,
          where: str) -> Any:
    import datasets

    sliced = split is not None and "[" in split  # e.g. train[:10%]: datasets' own syntax
    data = datasets.load_dataset(path, config, split=split if sliced else None,
                                 streaming=streaming, cache_dir=cache)
    return data if sliced else one_split(data, split, where)


def load_hub_dataset(name: str, *, config: str | None = None, split: str | None = None,
                     streaming: bool = False, download: bool = False) -> Any:
    """A ``datasets`` dataset by name: from the local caches, or the Hub with ``download``.

    Tried in order: the ``datasets`` cache (offline), the Hub cache's snapshot of the
    dataset repo (its data files read by ``load_dataset``), and -- only with
    ``download`` -- ``load_dataset`` online. ``split`` picks one split (default: the only
    one); ``config`` is the ``datasets`` configuration (subset) name.
    """
    import datasets

    cache = str(datasets_cache())
    where = f"dataset {name}" + (f" ({config})" if config else "")
    with _offline():
        try:
            return _load(name, config, split, streaming, cache, where)
        except DatasleuthError:
            raise
        except Exception:  # not in the datasets cache (ConnectionError, FileNotFoundError, ...)
            pass
    snapshot = _snapshot(name, "dataset", download=False)
    if snapshot is not None:
        try:
            return _load(str(snapshot), config, split, streaming, cache, where)
        except DatasleuthError:
            raise
        except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
            raise DatasleuthError(f"cannot read {where} from its cached snapshot {snapshot} "
                                  f"({str(e).splitlines()[0]}); check --dataset-config and "
                                  "--split") from e
    if not download:
        raise DatasleuthError(f"corpus {name} is neither a local file or folder nor a dataset in "
                              f"the Hugging Face caches ({cache}, {hub_cache()}); check the "
                              "path, or pass --download to fetch the dataset from the Hub")
    try:
        return _load(name, config, split, streaming, cache, where)
    except DatasleuthError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasleuthError(f"cannot load {where} from the Hub ({first}); check the name, "
                              "--dataset-config and --split") from e
