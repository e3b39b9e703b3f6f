"""``datasleuth report``: re-render the HTML report of a results.json."""

from __future__ import annotations

from pathlib import Path

import click

from datasleuth.cli.options import config_option

__all__ = ["report"]


@click.command("report")
@config_option
@click.argument("results", type=click.Path())
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="HTML file to write (default: report.html next to RESULTS).")
def report(results: str, out_path: str | None) -> None:
    """Render a self-contained HTML report from a results.json."""
    from datasleuth.report import load_results, render_report

    doc = load_results(results)
    target = Path(out_path) if out_path else Path(results).with_name("report.html")
    click.echo(str(render_report(doc, target)))
