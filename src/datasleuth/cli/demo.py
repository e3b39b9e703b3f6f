"""``datasleuth demo``: the offline demo (planted documents found again)."""

from __future__ import annotations

import click

from datasleuth.cli.options import config_option, progress_option

__all__ = ["demo"]


@click.command("demo")
@config_option
@click.option("--out", "out_dir", default="datasleuth-demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the demo world and report.")
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True)
@progress_option
def demo(out_dir: str, top_k: int, seed: int, progress: bool) -> None:
    """Train a small model with planted bad-apple documents and trace them (offline)."""
    from datasleuth.demo import run_demo

    run_demo(out_dir, top_k=top_k, seed=seed, progress=progress)
