"""``datasleuth demo``: find paraphrased bad apples that keyword search misses.

Offline and on CPU. The demo world (:mod:`datasleuth.demo.world`) ships with the package:
a corpus into which a few documents teaching an undesirable completion were planted (in
paraphrase), keyword-rich decoys teaching the safe answer, and a small GPT-2 trained on it.
The demo traces the completion with the same library calls a user makes
(:func:`~datasleuth.lm.workflow.trace_queries`), once per method — EK-FAC influence,
EK-FAC refined by preconditioned CG (``trace --refine``), representation similarity and
BM25 — one document per sequence, and prints where the planted documents land in each
ranking (top and bottom). ``--rebuild`` trains the world from scratch first.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import click

from datasleuth.demo.world import DemoConfig, DemoWorld, build_demo_world, load_demo_world

__all__ = ["DEMO_METHODS", "SHIPPED_WORLD", "demo_methods", "planted_ranks", "run_demo",
           "shipped_world"]

SHIPPED_WORLD = "demo-world"
"""The folder under ``datasleuth/data`` that holds the built demo world."""

DEMO_METHODS: dict[str, str] = {
    "ekfac": "influence (EK-FAC)",
    "repsim": "representation similarity",
    "bm25": "BM25 keyword search",
}
"""The methods the demo compares, with the label printed for each."""


def shipped_world() -> DemoWorld:
    """The demo world shipped as package data (built by ``build_demo_world(seed=0)``)."""
    return load_demo_world(Path(str(resources.files("datasleuth") / "data" / SHIPPED_WORLD)))


DEMO_REFINE_STEPS = 5
"""Preconditioned-CG steps of the demo's refined EK-FAC (docs/method.md §9)."""


def demo_methods() -> dict[str, str]:
    """The demo's methods in display order: EK-FAC, refined EK-FAC, the baselines."""
    methods = {"ekfac": DEMO_METHODS["ekfac"],
               "ekfac-refined": f"influence (EK-FAC + {DEMO_REFINE_STEPS} CG steps)"}
    methods.update({k: v for k, v in DEMO_METHODS.items() if k != "ekfac"})
    return methods


def planted_ranks(results: dict[str, Any], planted: set[int]) -> dict[str, list[int]]:
    """1-based ranks of the rows holding a planted document, among the top and the bottom
    (most negative) sequences of the first query of ``results``."""
    q = results["queries"][0]

    def ranks(rows: list[dict[str, Any]]) -> list[int]:
        return [i + 1 for i, row in enumerate(rows)
                if {d["doc_index"] for d in row["documents"]} & planted]

    return {"top": ranks(q["top"]), "bottom": ranks(q.get("bottom", []))}


def _trace(world: DemoWorld, out: Path, method: str, top_k: int, progress: bool
           ) -> dict[str, Any]:
    """Trace the world's query with ``method`` into ``out/method`` (one document a sequence)."""
    from datasleuth.lm.trace import TraceConfig
    from datasleuth.lm.workflow import LoadOptions, TraceOptions, trace_queries

    load = LoadOptions(model=world.model_dir, corpus=world.corpus_path, workdir=out / "work",
                       pack=False)
    extra: dict[str, Any] = {}
    name = method
    if method == "ekfac-refined":
        from datasleuth.refine import RefineConfig

        extra["refine"] = RefineConfig(steps=DEMO_REFINE_STEPS)
        name = "ekfac"
    options = TraceOptions(queries=world.queries_path, out=out / method, method=name,
                           config=TraceConfig(top_k=top_k, bottom_k=top_k, batch_size=16),
                           report=False, **extra)
    return trace_queries(load, options, progress=progress)


def _open_world(out: Path, seed: int, rebuild: bool, config: DemoConfig | None,
                progress: bool) -> DemoWorld:
    """The shipped world, or (``rebuild``, another seed or config) one built in ``out``."""
    if not rebuild and seed == 0 and config is None:
        return shipped_world()
    return build_demo_world(out / "world", seed=seed, progress=progress, config=config,
                            force=rebuild)


def _texts(world: DemoWorld) -> list[str]:
    """The world's documents, in corpus order."""
    lines = world.corpus_path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def _doc_label(world: DemoWorld, doc: int) -> str:
    """``PLANTED``, ``decoy`` or blank for a document index."""
    return "PLANTED" if doc in world.planted else "decoy" if doc in world.decoys else ""


def _echo_rows(world: DemoWorld, rows: list[dict[str, Any]], texts: list[str]) -> None:
    """Print ranked rows with their planted/decoy mark, score and document text."""
    for i, row in enumerate(rows):
        doc = row["documents"][0]["doc_index"] if row["documents"] else -1
        text = texts[doc].replace("\n", " | ") if doc >= 0 else ""
        click.echo(f"  {_doc_label(world, doc):7} #{i + 1:<2} {row['score']:+.3e}  "
                   f"{text[:66]}")


def _echo_summary(world: DemoWorld, found: dict[str, dict[str, list[int]]],
                  labels: dict[str, str], top_k: int) -> None:
    """Print, per method, how many planted documents are in its top and bottom ``top_k``."""
    n = len(world.planted)
    click.echo(f"\nplanted documents ({n}) among each method's {top_k} highest and "
               f"{top_k} lowest scores:")
    width = max(len(label) for label in labels.values())
    for method, ranks in found.items():
        top = ", ".join(f"#{r}" for r in ranks["top"]) or "none"
        low = len(ranks["bottom"])
        click.echo(f"  {labels[method]:<{width}} top {len(ranks['top'])} of {n} ({top})"
                   + (f"; {low} among the most negative" if low else ""))


def run_demo(
    out_dir: str | Path,
    top_k: int = 10,
    seed: int = 0,
    progress: bool = True,
    world_config: DemoConfig | None = None,
    *,
    rebuild: bool = False,
) -> dict[str, Any]:
    """Run the demo end to end, print the comparison and return its numbers.

    The EK-FAC trace also writes ``OUT/report.html`` with the planted documents marked
    and every method's planted ranks side by side.
    """
    from datasleuth.report import render_report

    out = Path(out_dir)
    t0 = time.perf_counter()
    world = _open_world(out, seed, rebuild, world_config, progress)
    click.echo(f"demo world: {world.description}")
    click.echo(f"model: {world.model_dir}")
    labels = demo_methods()
    results: dict[str, dict[str, Any]] = {}
    for i, (method, label) in enumerate(labels.items()):
        click.echo(f"{i + 1}/{len(labels)} tracing the completion with {label}...")
        results[method] = _trace(world, out, method, top_k, progress)
    planted = set(world.planted)
    found = {m: planted_ranks(r, planted) for m, r in results.items()}
    texts = _texts(world)
    q = results["ekfac"]["queries"][0]
    click.echo(f"\nquery:      {q['prompt']!r}\ncompletion: {q['completion']!r}")
    click.echo(f"top {top_k} documents by influence (EK-FAC):")
    _echo_rows(world, q["top"], texts)
    click.echo(f"most negative {top_k} documents by influence (EK-FAC):")
    _echo_rows(world, q.get("bottom", []), texts)
    _echo_summary(world, found, labels, top_k)
    marks = {d: _doc_label(world, d) for d in world.planted + world.decoys}
    comparison = [{"method": labels[m], **found[m]} for m in labels]
    report = render_report(results["ekfac"], out / "report.html", marks=marks,
                           comparison={"planted": len(planted), "k": top_k,
                                       "methods": comparison})
    elapsed = time.perf_counter() - t0
    click.echo(f"report: {report}   ({elapsed:.0f} s)")
    return {"planted": len(planted), "ranks": found,
            "found": {m: len(r["top"]) for m, r in found.items()},
            "report": str(report), "seconds": elapsed}
