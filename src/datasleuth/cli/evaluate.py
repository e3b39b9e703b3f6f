"""``datasleuth evaluate``: run the evaluation suite on a recipe and print the table, or
tail-patch a trace's results on the user's own model (``--tail-patch RESULTS.json``).

User errors are :class:`~datasleuth.errors.DatasleuthError`, which the main CLI prints
as one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from datasleuth.cli.options import config_option
from datasleuth.errors import DatasleuthError

__all__ = ["evaluate"]


@click.command("evaluate")
@config_option
@click.option("--recipe", default="digits", show_default=True,
              help="Built-in recipe (digits, digits-mislabeled, tiny-lm, fact-tracing) or a "
                   ".py file defining `recipe = Recipe(...)` (the file is executed).")
@click.option("--estimators", default=None,
              help="Comma list of estimators (default: all: identity, diagonal, kfac, ekfac, "
                   "exact_ggn, exact_ggn_layers, cg, lissa, ekfac_shared_labels, ekfac_refined, "
                   "ekfac_astra) and baselines (cosine, repsim, "
                   "bm25).")
@click.option("--subsets", default=32, show_default=True, type=click.IntRange(0),
              help="Random 50% subsets retrained for the LDS (0 = no LDS).")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1),
              help="Training seeds per subset (their measurements are averaged).")
@click.option("--damping", default=None, type=float,
              help="Absolute damping for every estimator (default: the recipe's, else "
                   "0.1 x mean eigenvalue per layer, matched by the reference estimators).")
@click.option("--pbrf", "pbrf_examples", default=0, show_default=True,
              type=click.IntRange(0), help="Training examples given PBRF ground truth.")
@click.option("--cache-dir", default="datasleuth-eval-cache", show_default=True,
              type=click.Path(file_okay=False),
              help="Retrained-model measurements are kept here and reused.")
@click.option("--out", "out_dir", default="datasleuth-eval", show_default=True,
              type=click.Path(file_okay=False), help="Folder for results.json.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="torch CPU threads (1 is fastest for the built-in tiny models).")
@click.option("--tail-patch", "tail_patch", multiple=True, type=click.Path(dir_okay=False),
              help="Tail-patch the results.json of a trace (repeatable: traces of the same "
                   "queries) on its model and corpus, beside random, BM25 and repsim "
                   "sequences; writes OUT/tail_patch.json, OUT/results.json, report.html.")
@click.option("--model", "model_path", default=None, type=click.Path(),
              help="With --tail-patch: the model [default: the trace's, from the "
                   "config.resolved.json beside its results, else the results' model].")
@click.option("--corpus", "corpus_path", multiple=True, type=click.Path(),
              help="With --tail-patch: the corpus [default: the trace's].")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="With --tail-patch: the packed corpus and BM25 index [default: the "
                   "trace's].")
@click.option("--seq-len", default=None, type=click.IntRange(2),
              help="With --tail-patch: tokens per packed sequence [default: the trace's].")
@click.option("--device", default=None, help="With --tail-patch: torch device [default: the "
              "trace's, else cpu].")
@click.option("--dtype", default=None,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="With --tail-patch [default: the trace's, else auto].")
@click.option("--tail-k", default=None, type=click.IntRange(1),
              help="Sequences patched per method and query (default 10 with --tail-patch; "
                   "with --recipe, giving it adds tail-patch to the suite).")
@click.option("--tail-steps", default=1, show_default=True, type=click.IntRange(1))
@click.option("--tail-optimizer", default="adam", show_default=True,
              type=click.Choice(["adam", "sgd"]),
              help="adam continues from second moments estimated on training batches; an sgd "
                   "step favours the dot product by construction (docs/method.md §10).")
@click.option("--tail-lr", default=1e-4, show_default=True, type=float)
@click.option("--tail-warmup", default=16, show_default=True, type=click.IntRange(0),
              help="Random batches of k training sequences Adam's second moments are "
                   "estimated on (0: a fresh Adam, whose first step is lr x sign(gradient)).")
@click.option("--tail-draws", default=5, show_default=True, type=click.IntRange(0),
              help="Random k-subsets per query.")
@click.option("--tail-seed", default=0, show_default=True, type=int)
@click.option("--tail-methods", default="bm25,repsim", show_default=True,
              help="Rankings computed beside the traces' (comma list of bm25, repsim).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
              help="With --tail-patch: sequences per forward/backward pass.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress messages and the retraining bar.")
def evaluate(**options: Any) -> None:
    """Score influence estimators and baselines by LDS, agreement with exact influence,
    detection and fact tracing; or tail-patch a trace's results (--tail-patch)."""
    if options["threads"] is not None:
        import torch

        torch.set_num_threads(options["threads"])
    if options["tail_patch"]:
        _tail_patch_traces(options)
    else:
        _suite(options)


def _tail_config(options: Mapping[str, Any], default_k: int | None) -> Any:
    from datasleuth.evaluation.tail_patch import TailPatchConfig

    k = options["tail_k"] if options["tail_k"] is not None else default_k
    if k is None:
        return None
    return TailPatchConfig(k=k, steps=options["tail_steps"], optimizer=options["tail_optimizer"],
                           lr=options["tail_lr"], warmup=options["tail_warmup"],
                           draws=options["tail_draws"],
                           seed=options["tail_seed"], batch_size=options["batch_size"])


def _suite(options: Mapping[str, Any]) -> None:
    """The evaluation suite on a recipe, printed as tables."""
    from datasleuth.evaluation import suite
    from datasleuth.evaluation.retrieval import retrieval_table, tail_patch_group_table

    names = (suite.parse_estimators(options["estimators"]) if options["estimators"]
             else list(suite.DEFAULT_ESTIMATORS))
    if options["subsets"] == 1:
        raise DatasleuthError("--subsets 1 gives no rank correlation; use 0 (no LDS) or >= 2")
    progress, out_dir = options["progress"], options["out_dir"]
    log = (lambda message: click.echo(message, err=True)) if progress else None
    doc = suite.evaluate(options["recipe"], names, n_subsets=options["subsets"],
                         seeds_per_subset=options["seeds"], cache_dir=options["cache_dir"],
                         damping=options["damping"], pbrf_examples=options["pbrf_examples"],
                         tail_patch=_tail_config(options, None), out=out_dir,
                         progress=progress, log=log)
    info = doc["recipe"]
    click.echo(f"recipe {info['name']}: {info['description']}")
    tables = [suite.markdown_table(doc), suite.detection_table(doc)]
    if doc.get("retrieval"):
        tables.append(retrieval_table(doc["retrieval"], ks=[max(doc["retrieval"]["ks"])]))
    if doc.get("tail_patch"):
        tables.append(tail_patch_group_table(doc["tail_patch"]))
    for table in filter(None, tables):
        click.echo("")
        click.echo(table)
    click.echo("")
    click.echo(f"results: {Path(out_dir) / 'results.json'}")


# The loading options of ``load_options_from`` and their defaults; a trace's
# config.resolved.json names them as --help does (``model`` for ``model_path``, ...).
_LOAD_DEFAULTS: dict[str, Any] = {
    "model_path": None, "corpus_path": (), "workdir": "datasleuth-work", "layers": (),
    "attention": False, "device": "cpu", "dtype": "auto", "trust_remote_code": False,
    "seq_len": None, "text_field": "text", "streaming": False, "tokenizer_path": None,
    "download": False, "separator": None, "no_pack": False, "split": None,
    "dataset_config": None}
_RENAMED = {"model": "model_path", "corpus": "corpus_path", "tokenizer": "tokenizer_path"}


def _trace_load_options(options: Mapping[str, Any], results: Mapping[str, Any]
                        ) -> tuple[Any, Any]:
    """How the traced model and corpus are loaded — the trace's own options (saved beside
    its results), then what these options override — and the trace's queries file."""
    from datasleuth.cli.options import RESOLVED_CONFIG, load_options_from, read_config

    saved = Path(options["tail_patch"][0]).with_name(RESOLVED_CONFIG)
    trace = read_config(saved) if saved.is_file() else {}
    values = dict(_LOAD_DEFAULTS)
    for key, value in trace.items():
        name = _RENAMED.get(key, key.replace("-", "_"))
        if name in values:
            values[name] = value
    values["model_path"] = options["model_path"] or values["model_path"] or results["model"]
    values["corpus_path"] = options["corpus_path"] or values["corpus_path"] or \
        [results["corpus"]]
    for name in ("workdir", "seq_len", "device", "dtype"):
        if options[name] is not None:
            values[name] = options[name]
    if values["seq_len"] is None:
        values["seq_len"] = (results.get("config") or {}).get("seq_len")
    return load_options_from(values), trace.get("queries")


def _tail_patch_traces(options: Mapping[str, Any]) -> None:
    """Tail-patch trace results on the model and corpus they were traced with."""
    from datasleuth.evaluation.tail_patch import tail_patch_table
    from datasleuth.lm.workflow import TailPatchOptions, tail_patch_results
    from datasleuth.report import load_results

    load, queries = _trace_load_options(options, load_results(options["tail_patch"][0]))
    methods = tuple(m.strip() for m in options["tail_methods"].split(",") if m.strip())
    settings = TailPatchOptions(options["tail_patch"], out=options["out_dir"],
                                config=_tail_config(options, 10), methods=methods,
                                batch_size=options["batch_size"], queries=queries)
    doc = tail_patch_results(load, settings, progress=options["progress"])
    click.echo(f"tail-patch: rise of {doc['measurement']} over {len(doc['queries'])} queries")
    click.echo(tail_patch_table(doc))
    out = Path(options["out_dir"])
    click.echo(f"\nresults: {out / 'tail_patch.json'}, {out / 'results.json'}, "
               f"{out / 'report.html'}")
