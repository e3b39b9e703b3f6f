"""``datasleuth demo``: plant bad apples, train a small GPT-2, find them again.

Offline and on CPU: builds a procedurally generated corpus into which a handful of
documents teaching an undesirable completion were planted, trains a small GPT-2 on
it (transformers' own ``Conv1D`` layers), then runs the same steps a user runs —
pack, fit EK-FAC, trace the completion, write the HTML report — and compares the
planted documents found in the top-k with what BM25 keyword search finds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from datasleuth.demo.world import DemoConfig, build_demo_world
from datasleuth.fitting import FitConfig
from datasleuth.lm.corpus import PackedCorpus
from datasleuth.lm.queries import Query, load_queries
from datasleuth.lm.trace import TraceConfig

__all__ = ["run_demo", "planted_found"]

DEMO_SEQ_LEN = 64


def planted_found(corpus: PackedCorpus, indices: list[int], planted: set[int]) -> set[int]:
    """Planted document indices that occur in any of the given training sequences."""
    return {s.doc_index for i in indices for s in corpus.segments(i) if s.doc_index in planted}


def _bm25_top(corpus: PackedCorpus, query: Query, tokenizer: Any, work: Path,
              top_k: int) -> list[int]:
    """Indices of the ``top_k`` sequences BM25 ranks highest for ``query``."""
    from datasleuth.lm.pipeline import bm25_candidates, query_batches

    encoded, _ = query_batches([query], tokenizer, 1)
    ignore = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
    return bm25_candidates(corpus, encoded, work, top_k, ignore)[0].tolist()


def _echo_top(query: Query, top: list[dict[str, Any]], top_k: int, planted: set[int]) -> None:
    """Print ``query`` and its ``top_k`` sequences by influence, marking planted ones."""
    click.echo("")
    click.echo(f"query:      {query.prompt!r}")
    click.echo(f"completion: {query.completion!r}")
    click.echo(f"top {top_k} training sequences by influence (EK-FAC):")
    for row in top[:top_k]:
        docs = {d["doc_index"] for d in row["documents"]}
        mark = "PLANTED" if docs & planted else "       "
        text = "".join(row["tokens"]).replace("\n", " ").replace("⏎", " | ")
        click.echo(f"  {mark} #{row['rank']:<2} score {row['score']:+9.3f}  {text[:72]!r}")
    click.echo("")


def run_demo(
    out_dir: str | Path,
    top_k: int = 10,
    seed: int = 0,
    progress: bool = True,
    world_config: DemoConfig | None = None,
) -> dict[str, Any]:
    """Run the demo end to end; print the comparison; return its numbers."""
    from datasleuth.lm.model import default_layers, load_model
    from datasleuth.lm.pipeline import fit_factors, prepare_corpus, run_trace
    from datasleuth.report import render_report

    out = Path(out_dir)
    t0 = time.perf_counter()
    click.echo("1/5 building the demo world (corpus with planted documents, small GPT-2)...")
    world = build_demo_world(out / "world", seed=seed, progress=progress, config=world_config)
    click.echo(f"    {world.description}")
    click.echo(f"    {len(world.planted)} planted documents; model in {world.model_dir}"
               + (" (reused)" if world.reused else ""))
    model, tokenizer = load_model(world.model_dir)
    layers = default_layers(model)
    click.echo("2/5 packing the corpus...")
    corpus = prepare_corpus(world.corpus_path, tokenizer, out / "work", DEMO_SEQ_LEN,
                            progress=progress)
    click.echo(f"3/5 fitting EK-FAC on {len(corpus)} sequences, {len(layers)} MLP layers...")
    curvature = fit_factors(model, layers, corpus, out / "work", FitConfig(), batch_size=16,
                            progress=progress)
    click.echo("4/5 tracing the completion through the corpus...")
    results = run_trace(model, tokenizer, corpus, curvature, world.queries_path, out,
                        TraceConfig(top_k=top_k, bottom_k=5, batch_size=16),
                        model_name="datasleuth demo GPT-2", corpus_name=str(world.corpus_path),
                        progress=progress)
    report = render_report(results, out / "report.html")
    click.echo("5/5 comparing with BM25 keyword search...")
    query = load_queries(world.queries_path)[0]
    bm25_top = _bm25_top(corpus, query, tokenizer, out / "work", top_k)
    planted = set(world.planted)
    q = results["queries"][0]
    found_if = planted_found(corpus, [row["index"] for row in q["top"]], planted)
    found_bm25 = planted_found(corpus, bm25_top, planted)
    elapsed = time.perf_counter() - t0
    _echo_top(query, q["top"], top_k, planted)
    click.echo(f"planted documents found in the top {top_k} sequences:")
    click.echo(f"  influence (EK-FAC): {len(found_if)} of {len(planted)}")
    click.echo(f"  BM25 keyword search: {len(found_bm25)} of {len(planted)}")
    click.echo(f"report: {report}   ({elapsed:.0f} s)")
    return {"planted": len(planted), "found_influence": len(found_if),
            "found_bm25": len(found_bm25), "report": str(report), "seconds": elapsed}
