"""The language-model commands: ``fit``, ``trace``, ``index``, ``self-influence``.

Each one parses its options into the option types of :mod:`datasleuth.lm.workflow`,
calls the workflow function of the same job and prints what it found. Under torchrun
every process runs the workflow and rank 0 alone prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from datasleuth.cli.options import (
    config_option,
    corpus_options,
    fit_options,
    fit_options_from,
    load_options_from,
    model_options,
    progress_option,
)

if TYPE_CHECKING:
    from datasleuth.lm.workflow import TraceOptions

__all__ = ["fit", "trace", "index", "self_influence", "print_summary", "print_self_influence"]


def _rank_zero() -> bool:
    from datasleuth.distributed import world

    return world()[0] == 0


def _say(message: str) -> None:
    from datasleuth.lm.pipeline import say

    say(message)


@click.command("fit")
@config_option
@model_options
@corpus_options
@fit_options
@progress_option
def fit(**options: Any) -> None:
    """Fit curvature factors (EK-FAC by default) for a model on its corpus."""
    from datasleuth.lm import workflow

    workflow.fit(load_options_from(options), fit_options_from(options),
                 progress=options["progress"])


def trace_options_from(values: Mapping[str, Any]) -> TraceOptions:
    """The ``trace`` command's own options as :class:`TraceOptions`."""
    from datasleuth.lm.trace import TraceConfig
    from datasleuth.lm.workflow import Candidates, TraceOptions

    candidates = Candidates(
        bm25=values["candidates"] if values["filter_kind"] == "bm25" else None,
        rank=values["rank"], index=values["index_dir"], approximate=values["approximate"],
        rescore=values["rescore"])
    config = TraceConfig(top_k=values["top_k"], bottom_k=values["bottom_k"],
                         batch_size=values["batch_size"], power_law=values["power_law"])
    return TraceOptions(values["queries_path"], out=values["out_dir"], config=config,
                        candidates=candidates, all_scores=values["all_scores"],
                        report=not values["no_report"], method=values["method"])


@click.command("trace")
@config_option
@model_options
@corpus_options
@fit_options
@click.option("--queries", "queries_path", required=True, type=click.Path(),
              help='JSONL of {"prompt": ..., "completion": ...} lines.')
@click.option("--out", "out_dir", default="datasleuth-out", show_default=True,
              type=click.Path(file_okay=False), help="Folder for results.json and report.html.")
@click.option("--top-k", default=20, show_default=True, type=click.IntRange(1))
@click.option("--bottom-k", default=10, show_default=True, type=click.IntRange(0))
@click.option("--method", default=None,
              help="ekfac | kfac | diagonal | dot (influence, factors fitted and reused) or "
                   "cosine | repsim | bm25 (baselines); one per run, default: --curvature. "
                   "Compare methods with `datasleuth evaluate --tail-patch`.")
@click.option("--filter", "filter_kind", type=click.Choice(["none", "bm25"]), default="none",
              show_default=True, help="Pre-select candidates by BM25 token overlap (biased).")
@click.option("--candidates", default=10_000, show_default=True, type=click.IntRange(1),
              help="Candidates per query kept by --filter bm25.")
@click.option("--all-scores", is_flag=True,
              help="Also write every score to OUT/scores/ (Parquet parts).")
@click.option("--no-report", is_flag=True, help="Skip writing report.html.")
@click.option("--power-law", is_flag=True,
              help="Also fit a power law to each query's score tail (about 0.5 s a query).")
@click.option("--rank", type=click.IntRange(1), default=None,
              help="Query batching: scan with rank-K query gradients (32 is typical), then "
                   "re-score each query's best candidates at full rank.")
@click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
              help="Take candidates from a projected-gradient index (`datasleuth index`) "
                   "instead of scanning the corpus; they are re-scored with full EK-FAC.")
@click.option("--approximate", is_flag=True,
              help="With --index: search with FAISS (HNSW) instead of exactly.")
@click.option("--rescore", default=100, show_default=True, type=click.IntRange(1),
              help="With --rank or --index: candidates per query re-scored at full rank "
                   "(at least --top-k).")
@progress_option
def trace(**options: Any) -> None:
    """Find the training sequences that made each query's completion more (or less) likely."""
    from datasleuth.lm import workflow

    settings = trace_options_from(options)  # refuses conflicting options before any work
    results = workflow.trace_queries(load_options_from(options), settings,
                                     fit_options_from(options), progress=options["progress"])
    if not _rank_zero():
        return
    print_summary(results)
    if settings.report:
        _say(f"report: {settings.report_path}")
    _say(f"results: {settings.results_path}")


@click.command("index")
@config_option
@model_options
@corpus_options
@click.option("--out", "out_dir", default="datasleuth-index", show_default=True,
              type=click.Path(file_okay=False), help="Folder of the index (resumable).")
@click.option("--proj-dim", default=16, show_default=True, type=click.IntRange(1),
              help="Projected size of each side of every layer (k_in = k_out); a sequence "
                   "costs layers x proj-dim^2 numbers.")
@click.option("--index-dtype", default="float16", show_default=True,
              type=click.Choice(["float16", "float32"]), help="Storage type of the rows.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random projections.")
@click.option("--shard-size", default=4096, show_default=True, type=click.IntRange(1),
              help="Sequences per shard file (the unit of resuming).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--fisher", default="sampled", show_default=True,
              type=click.Choice(["sampled", "empirical"]))
@click.option("--max-sequences", type=click.IntRange(1), default=None,
              help="Fit the projected curvature on at most this many sequences.")
@progress_option
def index(**options: Any) -> None:
    """Build a projected-gradient index of the corpus for fast `trace --index` queries."""
    from datasleuth.lm import workflow
    from datasleuth.scale.index import IndexConfig

    config = IndexConfig(k_in=options["proj_dim"], k_out=options["proj_dim"],
                         seed=options["seed"], dtype=options["index_dtype"],
                         shard_size=options["shard_size"])
    settings = workflow.IndexOptions(options["out_dir"], config=config,
                                     batch_size=options["batch_size"], fisher=options["fisher"],
                                     max_sequences=options["max_sequences"])
    workflow.index_corpus(load_options_from(options), settings, progress=options["progress"])


@click.command("self-influence")
@config_option
@model_options
@corpus_options
@fit_options
@click.option("--out", "out_dir", default="datasleuth-self", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder for self_influence.parquet (all) and .json (top-k).")
@click.option("--top-k", default=20, show_default=True, type=click.IntRange(1))
@progress_option
def self_influence(**options: Any) -> None:
    """Rank training sequences by self-influence: candidates for corrupt or odd data."""
    from datasleuth.lm import workflow

    settings = workflow.SelfInfluenceOptions(options["out_dir"], top_k=options["top_k"],
                                             batch_size=options["batch_size"])
    doc = workflow.rank_self_influence(load_options_from(options), settings,
                                       fit_options_from(options), progress=options["progress"])
    if not _rank_zero():
        return
    print_self_influence(doc)
    top, every = settings.paths
    _say(f"results: {top}, {every}")


def print_summary(results: dict[str, Any], width: int = 70) -> None:
    """Per query: its sparsity and best five sequences (stdout)."""
    for q in results["queries"]:
        click.echo(f"\nquery {q['id']}: {q['prompt']!r} -> {q['completion']!r}"
                   f"  ({q['n_scanned']} sequences scanned)")
        sparsity = q.get("sparsity") or {}
        if sparsity.get("top_share"):
            line = (f"  top 1% of sequences hold {100 * sparsity['top_share']['0.01']:.0f}% "
                    "of the positive influence")
            if sparsity.get("power_law"):
                line += f"; power-law tail alpha = {sparsity['power_law']['alpha']:.2f}"
            click.echo(line)
        for row in q["top"][:5]:
            text = "".join(row["tokens"]).replace("\n", " ")
            flag = "  [spurious]" if row["spurious"] else ""
            click.echo(f"  #{row['rank']:<2} seq {row['index']:<6} score {row['score']:+.4g}  "
                       f"{text[:width]!r}{flag}")


def print_self_influence(doc: dict[str, Any], width: int = 60) -> None:
    """The top sequences by self-influence with their loss rank (stdout)."""
    click.echo(f"\ntop {len(doc['top'])} of {doc['n_sequences']} sequences by self-influence "
               "(loss rank in brackets):")
    for row in doc["top"]:
        text = row["text"].replace("\n", " ")
        click.echo(f"  #{row['rank']:<3} seq {row['index']:<6} {row['self_influence']:+.4g}  "
                   f"[loss #{row['loss_rank']}]  {text[:width]!r}")
