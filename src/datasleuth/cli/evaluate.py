"""``datasleuth evaluate``: run the evaluation suite on a recipe and print the table.

User errors are :class:`~datasleuth.errors.DatasleuthError`, which the main CLI prints
as one line.
"""

from __future__ import annotations

from pathlib import Path

import click

from datasleuth.cli.options import config_option
from datasleuth.errors import DatasleuthError

__all__ = ["evaluate"]


@click.command("evaluate")
@config_option
@click.option("--recipe", default="digits", show_default=True,
              help="Built-in recipe (digits, digits-mislabeled, tiny-lm) or a .py file "
                   "defining `recipe = Recipe(...)` (the file is executed).")
@click.option("--estimators", default=None,
              help="Comma list of estimators (default: all: identity, diagonal, kfac, ekfac, "
                   "exact_ggn, exact_ggn_layers, cg, lissa).")
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
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show progress messages and the retraining bar.")
def evaluate(recipe: str, estimators: str | None, subsets: int, seeds: int,
             damping: float | None, pbrf_examples: int, cache_dir: str, out_dir: str,
             threads: int | None, progress: bool) -> None:
    """Score influence estimators by LDS, agreement with exact influence and detection."""
    from datasleuth.evaluation import suite

    names = suite.parse_estimators(estimators) if estimators else list(suite.DEFAULT_ESTIMATORS)
    if subsets == 1:
        raise DatasleuthError("--subsets 1 gives no rank correlation; use 0 (no LDS) or >= 2")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    log = (lambda message: click.echo(message, err=True)) if progress else None
    doc = suite.evaluate(recipe, names, n_subsets=subsets, seeds_per_subset=seeds,
                         cache_dir=cache_dir, damping=damping, pbrf_examples=pbrf_examples,
                         out=out_dir, progress=progress, log=log)
    info = doc["recipe"]
    click.echo(f"recipe {info['name']}: {info['description']}")
    click.echo("")
    click.echo(suite.markdown_table(doc))
    table = suite.detection_table(doc)
    if table:
        click.echo("")
        click.echo(table)
    click.echo("")
    click.echo(f"results: {Path(out_dir) / 'results.json'}")
