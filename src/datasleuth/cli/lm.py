"""The language-model commands: ``fit``, ``trace``, ``index``, ``self-influence``.

Each one parses its options into the option types of :mod:`datasleuth.lm.workflow`,
calls the workflow function of the same job and prints what it found. Under torchrun
every process runs the workflow and rank 0 alone prints.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
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
    save_resolved_config,
    threads_option,
)

if TYPE_CHECKING:
    from datasleuth.lm.workflow import TraceOptions

__all__ = ["fit", "trace", "index", "self_influence", "print_summary", "print_self_influence",
           "finish", "duration"]


def _rank_zero() -> bool:
    from datasleuth.distributed import world

    return world()[0] == 0


def _say(message: str) -> None:
    from datasleuth.lm.pipeline import say

    say(message)


def duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 12 s`` or ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def finish(folder: str | Path, what: str, sequences: int, started: float) -> None:
    """Save the resolved options beside the results and say, in one line, how long the
    command took and its throughput in sequences per second."""
    config = save_resolved_config(click.get_current_context(), folder)
    elapsed = max(time.perf_counter() - started, 1e-9)
    _say(f"done: {what} in {duration(elapsed)} ({sequences} sequences, "
         f"{sequences / elapsed:.1f} sequences/s); options saved to {config}")


@click.command("fit")
@config_option
@model_options
@corpus_options
@fit_options
@threads_option
@progress_option
def fit(**options: Any) -> None:
    """Fit curvature factors (EK-FAC by default) for a model on its corpus."""
    from datasleuth.lm import workflow

    started = time.perf_counter()
    load = load_options_from(options)
    curvature = workflow.fit(load, fit_options_from(options), progress=options["progress"])
    finish(load.workdir, f"fit of {curvature.kind}", int(curvature.metadata.get("sequences", 0)),
           started)


def trace_options_from(values: Mapping[str, Any]) -> TraceOptions:
    """The ``trace`` command's own options as :class:`TraceOptions`."""
    from datasleuth.lm.trace import TraceConfig
    from datasleuth.lm.workflow import Candidates, TraceOptions
    from datasleuth.refine import RefineConfig

    candidates = Candidates(
        bm25=values["candidates"] if values["filter_kind"] == "bm25" else None,
        rank=values["rank"], index=values["index_dir"], approximate=values["approximate"],
        rescore=values["rescore"])
    config = TraceConfig(top_k=values["top_k"], bottom_k=values["bottom_k"],
                         batch_size=values["batch_size"], power_law=values["power_law"])
    refine = None if values["refine_steps"] is None else RefineConfig(
        steps=values["refine_steps"], scheme=values["refine_scheme"],
        batches=values["refine_batches"], cross_layer=values["refine_cross_layer"])
    return TraceOptions(values["queries_path"], out=values["out_dir"], config=config,
                        candidates=candidates, all_scores=values["all_scores"],
                        report=not values["no_report"], method=values["method"],
                        refine=refine)


@click.command("trace")
@config_option
@model_options
@corpus_options
@fit_options
@click.option("--queries", "queries_path", required=True, type=click.Path(),
              help='JSONL of {"prompt": ..., "completion": ...} lines, or chat transcripts '
                   '{"messages": [{"role": ..., "content": ...}, ...]} (last turn: the '
                   "assistant's, measured).")
@click.option("--out", "out_dir", default="datasleuth-out", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder for results.json, results.parquet and report.html.")
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
@click.option("--refine", "refine_steps", type=click.IntRange(0), default=None,
              help="Refine the curvature's inverse-curvature products with STEPS "
                   "Gauss-Newton steps on the corpus, EK-FAC as start and preconditioner; "
                   "each step costs one GGN-vector product per query and layer on the "
                   "refinement batches. Residuals per query go to results.json.")
@click.option("--refine-scheme", type=click.Choice(["cg", "richardson"]), default="cg",
              show_default=True, help="With --refine: preconditioned CG, or stochastic "
                   "preconditioned Richardson steps on fresh batches (ASTRA).")
@click.option("--refine-batches", type=click.IntRange(1), default=None,
              help="With --refine: batches (of --batch-size sequences) per GGN-vector "
                   "product, sampled; default every fitted sequence.")
@click.option("--refine-cross-layer", is_flag=True,
              help="With --refine: the Gauss-Newton matrix across tracked layers, not its "
                   "per-layer blocks (what EK-FAC approximates).")
@threads_option
@progress_option
def trace(**options: Any) -> None:
    """Find the training sequences that made each query's completion more (or less) likely."""
    from datasleuth.lm import workflow

    started = time.perf_counter()
    settings = trace_options_from(options)  # refuses conflicting options before any work
    results = workflow.trace_queries(load_options_from(options), settings,
                                     fit_options_from(options), progress=options["progress"])
    if not _rank_zero():
        return
    print_summary(results)
    if settings.report:
        _say(f"report: {settings.report_path}")
    _say(f"results: {settings.results_path}, {settings.table_path}")
    queries = results["queries"]
    finish(settings.out, f"trace of {len(queries)} queries",
           max((q["n_scanned"] for q in queries), default=0), started)


@click.command("index")
@config_option
@model_options
@corpus_options
@click.option("--out", "out_dir", default="datasleuth-index", show_default=True,
              type=click.Path(file_okay=False), help="Folder of the index (resumable).")
@click.option("--proj-dim", default="auto", show_default=True,
              help="'auto': sizes from each layer's effective dimension within "
                   "--bytes-per-sequence; or the projected size of each side of every layer "
                   "(k_in = k_out; a sequence costs layers x proj-dim^2 numbers).")
@click.option("--bytes-per-sequence", default=16384, show_default=True,
              type=click.IntRange(1), help="Disk budget per sequence for --proj-dim auto.")
@click.option("--whitening", default="ekfac-eigen", show_default=True,
              type=click.Choice(["ekfac-eigen", "ekfac", "kron", "none"]),
              help="Whiten gradients by a root of the fitted curvature before compressing: "
                   "ekfac-eigen keeps the EK-FAC eigen-coordinates of most whitened energy "
                   "(best agreement per byte measured); ekfac and kron (cheaper build) are "
                   "random Kronecker sketches after the exact or a Kronecker-factored root; "
                   "none is LoGra (curvature refitted in the projected space).")
@click.option("--index-dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "int1", "int2", "int4", "int8", "float16", "float32"]),
              help="Storage of the rows: intN are quantised per row and layer to N bits and "
                   "hold 16/N times the numbers of float16 in the same bytes; auto picks "
                   "the bits that keep the most whitened energy within --bytes-per-sequence "
                   "(float16 with a fixed --proj-dim).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random projections.")
@click.option("--shard-size", default=4096, show_default=True, type=click.IntRange(1),
              help="Sequences per shard file (the unit of resuming).")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--fisher", default="sampled", show_default=True,
              type=click.Choice(["sampled", "empirical"]))
@click.option("--max-sequences", type=click.IntRange(1), default=None,
              help="Fit the projected curvature on at most this many sequences.")
@threads_option
@progress_option
def index(**options: Any) -> None:
    """Build a projected-gradient index of the corpus for fast `trace --index` queries."""
    from datasleuth.errors import DatasleuthError
    from datasleuth.lm import workflow
    from datasleuth.scale.index import IndexConfig

    started = time.perf_counter()
    auto = options["proj_dim"].strip().lower() == "auto"
    if not auto and not (options["proj_dim"].isdigit() and int(options["proj_dim"]) >= 1):
        raise DatasleuthError(f"--proj-dim must be a positive integer or 'auto', not "
                              f"{options['proj_dim']!r}")
    k = None if auto else int(options["proj_dim"])
    whitening, _, projection = options["whitening"].partition("-")
    config = IndexConfig(k_in=k or 16, k_out=k or 16, seed=options["seed"],
                         dtype=options["index_dtype"], shard_size=options["shard_size"],
                         whitening=whitening, projection=projection or "gaussian")
    settings = workflow.IndexOptions(options["out_dir"], config=config,
                                     batch_size=options["batch_size"], fisher=options["fisher"],
                                     max_sequences=options["max_sequences"],
                                     bytes_per_sequence=options["bytes_per_sequence"] if auto
                                     else None)
    built = workflow.index_corpus(load_options_from(options), settings,
                                  progress=options["progress"])
    finish(settings.out, "index", built.rows, started)


@click.command("self-influence")
@config_option
@model_options
@corpus_options
@fit_options
@click.option("--out", "out_dir", default="datasleuth-self", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder for self_influence.parquet (all) and .json (top-k).")
@click.option("--top-k", default=20, show_default=True, type=click.IntRange(1))
@threads_option
@progress_option
def self_influence(**options: Any) -> None:
    """Rank training sequences by self-influence: candidates for corrupt or odd data."""
    from datasleuth.lm import workflow

    started = time.perf_counter()
    settings = workflow.SelfInfluenceOptions(options["out_dir"], top_k=options["top_k"],
                                             batch_size=options["batch_size"])
    doc = workflow.rank_self_influence(load_options_from(options), settings,
                                       fit_options_from(options), progress=options["progress"])
    if not _rank_zero():
        return
    print_self_influence(doc)
    top, every = settings.paths
    _say(f"results: {top}, {every}")
    finish(settings.out, "self-influence", doc["n_sequences"], started)


def print_summary(results: dict[str, Any], width: int = 70) -> None:
    """Per query: its sparsity and best five sequences (stdout)."""
    stage = (results.get("config") or {}).get("first_stage") or {"kind": "full"}
    for q in results["queries"]:
        click.echo(f"\nquery {q['id']}: {q['prompt']!r} -> {q['completion']!r}"
                   f"  ({_coverage(q, stage, results.get('config', {}).get('candidates_k'))})")
        sparsity = q.get("sparsity") or {}
        if sparsity.get("top_share"):
            line = (f"  top 1% of sequences hold {100 * sparsity['top_share']['0.01']:.0f}% "
                    "of the positive influence")
            if sparsity.get("power_law"):
                line += f"; power-law tail alpha = {sparsity['power_law']['alpha']:.2f}"
            click.echo(line)
        if q.get("refine_residual") is not None:
            click.echo(f"  refined: relative residual {q['ekfac_residual']:.3g} (EK-FAC) -> "
                       f"{q['refine_residual']:.3g}")
        for row in q["top"][:5]:
            text = "".join(row["tokens"]).replace("\n", " ")
            flag = "  [spurious]" if row["spurious"] else ""
            click.echo(f"  #{row['rank']:<2} seq {row['index']:<6} score {row['score']:+.4g}  "
                       f"{text[:width]!r}{flag}")


def _coverage(query: dict[str, Any], stage: dict[str, Any], bm25: int | None) -> str:
    """How many sequences a query's scores cover, in the words of the stage that chose them."""
    scanned, rescored = query["n_scanned"], query.get("n_rescored")
    kind = stage.get("kind")
    words = "BM25 candidates" if bm25 else "sequences"
    if kind == "index":
        return f"{rescored} sequences re-scored, chosen from {scanned} by the index"
    if kind == "low_rank":
        return (f"{scanned} {words} scanned at rank {stage.get('rank')}, {rescored} "
                "re-scored at full rank")
    return f"{scanned} {words} scanned"


def print_self_influence(doc: dict[str, Any], width: int = 60) -> None:
    """The top sequences by self-influence with their loss rank (stdout)."""
    click.echo(f"\ntop {len(doc['top'])} of {doc['n_sequences']} sequences by self-influence "
               "(loss rank in brackets):")
    for row in doc["top"]:
        text = row["text"].replace("\n", " ")
        names = ", ".join(_document_name(d) for d in row["documents"])
        click.echo(f"  #{row['rank']:<3} seq {row['index']:<6} {row['self_influence']:+.4g}  "
                   f"[loss #{row['loss_rank']}]  doc {names}  {text[:width]!r}")


def _document_name(doc: dict[str, Any]) -> str:
    """A document by the corpus's own id or title where it has one, else its index."""
    for key in ("id", "doc_id", "title", "source"):
        if doc.get(key):
            return f"{doc['doc_index']} ({doc[key]})"
    return str(doc["doc_index"])
