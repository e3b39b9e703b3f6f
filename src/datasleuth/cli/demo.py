"""``datasleuth demo``: the offline demo (planted documents found again)."""

from __future__ import annotations

import click

from datasleuth.cli.options import config_option, progress_option, threads_option

__all__ = ["demo"]


@click.command("demo")
@config_option
@click.option("--out", "out_dir", default="datasleuth-demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the demo world and report.")
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True,
              help="Seed of the demo world; any seed but 0 (the shipped world) builds one.")
@click.option("--rebuild", is_flag=True,
              help="Build the demo world from scratch (corpus, tokenizer, training) instead of "
                   "using the one shipped with the package.")
@threads_option
@progress_option
def demo(out_dir: str, top_k: int, seed: int, rebuild: bool, threads: int | None,
         progress: bool) -> None:
    """Find paraphrased planted documents that keyword search misses (offline, CPU).

    Traces a completion taught by planted documents through the shipped demo world with
    EK-FAC influence, representation similarity and BM25, and writes OUT/report.html.
    """
    from datasleuth.demo import run_demo

    run_demo(out_dir, top_k=top_k, seed=seed, progress=progress, rebuild=rebuild)
