"""Options shared by the commands, ``--config`` files, and the option types they build.

A ``--config FILE`` (TOML or JSON) holds a table of option values; its keys are the
option names (``seq-len`` or ``seq_len`` for ``--seq-len``, ``model`` for ``--model``).
Options given on the command line win. The file is read and checked before anything
runs; a missing, unreadable or malformed file, an unknown key or a bad value is one
``error: ...`` line (:class:`~datasleuth.errors.DatasleuthError`).
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
    "config_option",
    "progress_option",
    "model_options",
    "corpus_options",
    "fit_options",
    "read_config",
    "toml_module",
    "load_options_from",
    "fit_options_from",
]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


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


def _parameters_by_key(command: click.Command) -> dict[str, click.Parameter]:
    """Each parameter under its option names and its own name, dashes as underscores."""
    keys: dict[str, click.Parameter] = {}
    for param in command.params:
        if param.name is None or param.name == "config":
            continue
        keys[param.name] = param
        for opt in param.opts:
            keys.setdefault(opt.lstrip("-").replace("-", "_"), param)
    return keys


def config_defaults(ctx: click.Context, data: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``data`` (a config table) as click defaults of the command's parameters.

    Refuses unknown keys and values the option would refuse, in one line.
    """
    params = _parameters_by_key(ctx.command)
    unknown = sorted(k for k in data if k.replace("-", "_") not in params)
    if unknown:
        raise DatasleuthError(f"{path} sets unknown option(s) {', '.join(unknown)}; see --help "
                              "for the names")
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        param = params[key.replace("-", "_")]
        if param.multiple and isinstance(value, str):
            value = [value]  # one corpus or layer pattern given as a string
        try:
            param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise DatasleuthError(f"{path}: {key} = {value!r} is refused ({e.message}); fix "
                                  "the file") from None
        defaults[param.name] = value
    return defaults


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


def _stack(*decorators: Decorator) -> Decorator:
    """Apply ``decorators`` so that ``--help`` lists them in the order given."""
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


model_options = _stack(
    click.option("--model", "model_path", required=True, type=click.Path(),
                 help="Local folder of a Hugging Face causal LM or PEFT adapter."),
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
)

corpus_options = _stack(
    click.option("--workdir", default="datasleuth-work", show_default=True,
                 type=click.Path(file_okay=False),
                 help="Where packed corpus and factors are kept and reused."),
    click.option("--corpus", "corpus_path", required=True, multiple=True,
                 type=click.Path(), help="JSONL/Parquet/Arrow/text file or folder."),
    click.option("--seq-len", default=None, type=click.IntRange(2),
                 help="Tokens per packed training sequence [default: 512, or the "
                      "model's context if shorter]."),
    click.option("--text-field", default="text", show_default=True,
                 help="Field holding the text in JSONL/Parquet/Arrow corpora."),
    click.option("--streaming", is_flag=True,
                 help="Read the corpus files as a stream (no Arrow cache copy on disk), "
                      "for corpora larger than the free disk."),
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
)


def load_options_from(values: Mapping[str, Any]) -> LoadOptions:
    """The model and corpus options of a command as :class:`LoadOptions`."""
    from datasleuth.lm.workflow import LoadOptions

    return LoadOptions(
        model=values["model_path"], corpus=values["corpus_path"], workdir=values["workdir"],
        layers=values["layers"], attention=values["attention"], device=values["device"],
        dtype=values["dtype"], trust_remote_code=values["trust_remote_code"],
        seq_len=values["seq_len"], text_field=values["text_field"],
        streaming=values["streaming"],
    )


def fit_options_from(values: Mapping[str, Any]) -> FitOptions:
    """The fitting options of a command as :class:`FitOptions`."""
    from datasleuth.fitting import FitConfig
    from datasleuth.lm.workflow import FitOptions

    config = FitConfig(curvature=values["curvature"], damping=values["damping"],
                       fisher=values["fisher"], blocks=values["blocks"])
    return FitOptions(config, batch_size=values["batch_size"],
                      max_sequences=values["max_sequences"])
