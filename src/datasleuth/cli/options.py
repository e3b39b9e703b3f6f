"""Options shared by the commands, ``--config`` files, and the option types they build.

A ``--config FILE`` (TOML or JSON) holds a table of option values; its keys are the
option names ``--help`` shows (``seq-len`` or ``seq_len`` for ``--seq-len``, ``model``
for ``--model``, ``no-progress`` for ``--no-progress``). Options given on the command
line win. Every command saves the options it ran with as ``config.resolved.json``
beside its results (:func:`save_resolved_config`): ``--config`` replays the run. The
file is read and checked before anything runs; a missing, unreadable or malformed
file, an unknown key or a bad value is one ``error: ...`` line
(:class:`~datasleuth.errors.DatasleuthError`).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

from datasleuth.errors import DatasleuthError

if TYPE_CHECKING:
    from datasleuth.lm.workflow import FitOptions, LoadOptions

__all__ = [
    "RESOLVED_CONFIG",
    "config_option",
    "progress_option",
    "threads_option",
    "resolved_config",
    "save_resolved_config",
    "config_defaults",
    "model_options",
    "corpus_options",
    "fit_options",
    "read_config",
    "toml_module",
    "load_options_from",
    "fit_options_from",
]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
#: The file, beside a command's results, that replays the run with ``--config``.
RESOLVED_CONFIG = "config.resolved.json"


def toml_module(version: tuple[int, ...] | None = None) -> ModuleType:
    """The TOML reader: ``tomllib`` on Python 3.11+, the ``tomli`` package on 3.10.

    Both have the same API (``loads``, ``TOMLDecodeError``, a ``ValueError``).
    ``version`` defaults to the running interpreter's.
    """
    version = tuple(sys.version_info[:2]) if version is None else tuple(version)
    name = "tomllib" if version >= (3, 11) else "tomli"
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DatasleuthError("reading a TOML --config on Python 3.10 needs the tomli package; "
                              "pip install tomli, or give a JSON file") from None


def read_config(path: str | Path) -> dict[str, Any]:
    """The table of option values in a TOML or JSON (``.json``) file, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise DatasleuthError(f"--config {path} does not exist or is not a file; give a TOML "
                              "or JSON file")
    kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DatasleuthError(f"cannot read --config {path} ({e.strerror or e}); check the "
                              "file's permissions") from None
    except UnicodeDecodeError:
        raise DatasleuthError(f"--config {path} is not UTF-8 text; give a {kind} file") from None
    try:
        data = json.loads(text) if kind == "JSON" else toml_module().loads(text)
    except ValueError as e:  # json.JSONDecodeError and TOMLDecodeError are ValueErrors
        reason = " ".join(str(e).split())
        raise DatasleuthError(f"--config {path} is not valid {kind} ({reason}); fix the "
                              "file") from None
    if not isinstance(data, dict):
        raise DatasleuthError(f"--config {path} must hold a table of option names to values")
    return data


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def _parameters_by_key(command: click.Command) -> dict[str, tuple[click.Parameter, bool]]:
    """Each parameter under its option names (``--help``'s, ``--no-x`` of an on/off switch
    included: ``True`` marks those, whose value is inverted) and its own name, dashes as
    underscores."""
    keys: dict[str, tuple[click.Parameter, bool]] = {}
    for param in command.params:
        if param.name is None or param.name == "config":
            continue
        keys[param.name] = (param, False)
        for opt in param.opts:
            keys.setdefault(_key(opt), (param, False))
        for opt in getattr(param, "secondary_opts", []):
            keys.setdefault(_key(opt), (param, True))
    return keys


def config_defaults(ctx: click.Context, data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``data`` (a config table) as click defaults of the command's parameters.

    Keys are the option names ``--help`` shows (``seq-len``, ``no-progress``), with or
    without dashes for underscores. Refuses unknown keys and values the option would
    refuse, in one line.
    """
    params = _parameters_by_key(ctx.command)
    data = dict(data)
    command = data.pop("command", ctx.command.name)  # written by save_resolved_config
    if command != ctx.command.name:
        raise DatasleuthError(f"{path} holds the options of `datasleuth {command}`; give it to "
                              "that command")
    unknown = sorted(k for k in data if _key(k) not in params)
    if unknown:
        raise DatasleuthError(f"{path} sets unknown option(s) {', '.join(unknown)}; see --help "
                              "for the names")
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        param, inverted = params[_key(key)]
        if param.multiple and isinstance(value, str):
            value = [value]  # one corpus or layer pattern given as a string
        if inverted and not isinstance(value, bool):
            raise DatasleuthError(f"{path}: {key} = {value!r} is refused (not true or false); "
                                  "fix the file")
        try:
            param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise DatasleuthError(f"{path}: {key} = {value!r} is refused ({e.message}); fix "
                                  "the file") from None
        except (TypeError, ValueError) as e:  # e.g. a TOML list where a number belongs
            raise DatasleuthError(f"{path}: {key} = {value!r} is refused (expected one "
                                  f"{param.type.name} value: {e}); fix the file") from None
        defaults[param.name] = (not value) if inverted else value
    return defaults


def resolved_config(ctx: click.Context) -> dict[str, Any]:
    """The options a command ran with, under their ``--help`` names: a ``--config`` file
    that replays the run. Unset options are left out; existing paths are made absolute."""
    out: dict[str, Any] = {}
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in (None, "config"):
            continue
        value = ctx.params.get(param.name)
        if value is None or (param.multiple and not value):
            continue
        if isinstance(param.type, click.Path):
            value = ([_absolute(v) for v in value] if param.multiple else _absolute(value))
        elif isinstance(value, tuple):
            value = list(value)
        name = max(param.opts, key=len)
        out[name.lstrip("-")] = value
    return out


def _absolute(value: Any) -> Any:
    path = Path(str(value))
    return str(path.resolve()) if path.exists() else value


def save_resolved_config(ctx: click.Context, folder: str | Path) -> Path:
    """Write :func:`resolved_config` to ``FOLDER/config.resolved.json`` (rank 0 only)."""
    from datasleuth.distributed import world
    from datasleuth.storage import write_json

    path = Path(folder) / RESOLVED_CONFIG
    if world()[0] == 0:
        write_json(path, {"command": ctx.command.name, **resolved_config(ctx)})
    return path


def _apply_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value:
        data = read_config(value)
        ctx.default_map = {**(ctx.default_map or {}), **config_defaults(ctx, data, value)}
    return value


config_option = click.option(
    "--config", type=click.Path(), metavar="FILE", callback=_apply_config, is_eager=True,
    expose_value=False,
    help="TOML or JSON file of option values (command line wins).",
)
progress_option = click.option("--progress/--no-progress", default=True, show_default=True,
                               help="Show progress bars with rates and time left.")


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None:
        import torch

        torch.set_num_threads(value)
    return value


threads_option = click.option(
    "--threads", type=click.IntRange(1), default=None, callback=_set_threads,
    help="torch CPU threads (torch.set_num_threads) [default: torch's choice].")


def _stack(*decorators: Decorator) -> Decorator:
    """Apply ``decorators`` so that ``--help`` lists them in the order given."""
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


model_options = _stack(
    click.option("--model", "model_path", required=True, type=click.Path(),
                 help="Local folder of a Hugging Face causal LM or PEFT adapter, or a Hub id "
                      "in the local Hugging Face cache (HF_HUB_CACHE)."),
    click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(),
                 help="Folder or Hub id of the tokenizer [default: the model's own]."),
    click.option("--download", is_flag=True,
                 help="Fetch a Hub model or datasets corpus missing from the local cache."),
    click.option("--layers", multiple=True,
                 help="Glob over module names to track (repeatable); overrides defaults."),
    click.option("--attention", is_flag=True,
                 help="Also track attention projections (MLP layers are the default)."),
    click.option("--device", default="cpu", show_default=True,
                 help="torch device, e.g. cuda:0."),
    click.option("--dtype", default="auto", show_default=True,
                 type=click.Choice(["auto", "float32", "bfloat16", "float16"])),
    click.option("--trust-remote-code", is_flag=True,
                 help="Allow the checkpoint's own Python code to run (off by default)."),
    click.option("--fsdp", is_flag=True,
                 help="Under torchrun, shard the model over the processes with FSDP2 "
                      "(models larger than one GPU)."),
)

corpus_options = _stack(
    click.option("--workdir", default="datasleuth-work", show_default=True,
                 type=click.Path(file_okay=False),
                 help="Where packed corpus and factors are kept and reused."),
    click.option("--corpus", "corpus_path", required=True, multiple=True,
                 type=click.Path(), help="JSONL/Parquet/Arrow/text file or folder, a "
                 "save_to_disk folder, or a datasets name (owner/name) in the local cache."),
    click.option("--split", default=None,
                 help="Split of a datasets name or save_to_disk folder [default: its only "
                      "split]."),
    click.option("--dataset-config", default=None,
                 help="Configuration (subset) of a datasets name."),
    click.option("--seq-len", default=None, type=click.IntRange(2),
                 help="Tokens per packed training sequence [default: 512, or the "
                      "model's context if shorter]."),
    click.option("--text-field", default="text", show_default=True,
                 help="Field holding the text in JSONL/Parquet/Arrow corpora."),
    click.option("--streaming", is_flag=True,
                 help="Read the corpus files as a stream (no Arrow cache copy on disk), "
                      "for corpora larger than the free disk."),
    click.option("--separator", default=None,
                 help="Token put after every document: a token such as '<|endoftext|>' or "
                      "its id [default: the EOS token]."),
    click.option("--no-pack", is_flag=True,
                 help="One document per sequence (padded; longer ones cut at --seq-len, with "
                      "a warning) instead of packing, for document-level results."),
)

fit_options = _stack(
    click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
                 help="Sequences per batch when fitting and scanning; with many queries "
                      "a larger batch amortizes reading their gradients."),
    click.option("--curvature", default="ekfac", show_default=True,
                 type=click.Choice(["ekfac", "kfac", "diagonal", "identity"])),
    click.option("--damping", type=float, default=None,
                 help="Absolute damping (default 0.1 x mean eigenvalue per layer)."),
    click.option("--fisher", default="sampled", show_default=True,
                 type=click.Choice(["sampled", "empirical"])),
    click.option("--blocks", default=1, show_default=True, type=click.IntRange(1),
                 help="Split each Kronecker factor into this many diagonal blocks."),
    click.option("--max-sequences", type=click.IntRange(1), default=None,
                 help="Fit on at most this many sequences (default: all)."),
    click.option("--factors", type=click.Path(dir_okay=False), default=None,
                 help="Use this curvature file (e.g. written by the Trainer callback, "
                      "datasleuth.lm.CurvatureCallback) instead of fitting on the corpus."),
    click.option("--max-factor-memory", type=click.FloatRange(min=0.001),
                 default=None, metavar="GIB",
                 help="GiB one layer's factors may take; a layer over it is split into "
                      "diagonal blocks (block-diagonal within the layer) [default: no limit]."),
    click.option("--eigh-precision", default="device", show_default=True,
                 type=click.Choice(["device", "auto", "float64", "float32"]),
                 help="Precision of the factors' eigendecompositions: 'device' is float32, "
                      "checked, on GPUs and float64 on CPUs; 'auto' (float32, checked, "
                      "float64 where it fails) halves their time on a CPU."),
)


def load_options_from(values: Mapping[str, Any]) -> LoadOptions:
    """The model and corpus options of a command as :class:`LoadOptions`."""
    from datasleuth.lm.workflow import LoadOptions

    return LoadOptions(
        model=values["model_path"], corpus=values["corpus_path"], workdir=values["workdir"],
        layers=values["layers"], attention=values["attention"], device=values["device"],
        dtype=values["dtype"], trust_remote_code=values["trust_remote_code"],
        seq_len=values["seq_len"], text_field=values["text_field"],
        streaming=values["streaming"], tokenizer=values["tokenizer_path"],
        download=values["download"], separator=values["separator"],
        pack=not values["no_pack"], split=values["split"],
        dataset_config=values["dataset_config"], fsdp=values.get("fsdp", False),
    )


def fit_options_from(values: Mapping[str, Any]) -> FitOptions:
    """The fitting options of a command as :class:`FitOptions`."""
    from datasleuth.fitting import FitConfig
    from datasleuth.lm.workflow import FitOptions

    budget = values.get("max_factor_memory")
    config = FitConfig(curvature=values["curvature"], damping=values["damping"],
                       fisher=values["fisher"], blocks=values["blocks"],
                       max_factor_memory=int(budget * 2**30) if budget else None,
                       eigh_precision=values.get("eigh_precision", "device"))
    return FitOptions(config, batch_size=values["batch_size"],
                      max_sequences=values["max_sequences"], factors=values.get("factors"))
