"""The ``datasleuth`` command line: fit, trace, report, index, evaluate, demo.

Every command accepts ``--config FILE`` (TOML or JSON) whose keys are option names;
options given on the command line win. User errors print one line, ``error: ...``,
and exit with status 2; no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from datasleuth.errors import DatasleuthError

__all__ = ["main", "cli"]

DEFAULT_SEQ_LEN = 512


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return value
    path = Path(value)
    if not path.is_file():
        raise click.BadParameter(f"{path} does not exist; give a TOML or JSON file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except Exception as e:  # tomllib and json raise their own types
        raise click.BadParameter(f"{path} is not valid TOML/JSON ({e}); fix the file") from e
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a table of option names to values")
    known = {p.name for p in ctx.command.params}
    unknown = sorted(k for k in data if k.replace("-", "_") not in known)
    if unknown:
        raise click.BadParameter(
            f"{path} sets unknown option(s) {', '.join(unknown)}; see --help for the names"
        )
    ctx.default_map = {**(ctx.default_map or {}), **{k.replace("-", "_"): v
                                                      for k, v in data.items()}}
    return value


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
    expose_value=False, help="TOML or JSON file of option values (command line wins).",
)
progress_option = click.option("--progress/--no-progress", default=True, show_default=True,
                               help="Show progress bars with rates and time left.")


def _quiet_libraries() -> None:
    """Keep transformers'/datasets' own chatter out of our output (errors still show)."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="datasleuth")
def cli() -> None:
    """Trace a language model's behaviour back to the training data that caused it.

    \b
    datasleuth demo                      offline demo: planted documents found again
    datasleuth fit   --model M --corpus C            fit EK-FAC factors
    datasleuth trace --model M --corpus C --queries Q   top-k training sequences + report
    datasleuth index --model M --corpus C            projected-gradient index
    datasleuth trace ... --index DIR                 candidates from the index, re-scored
    datasleuth report results.json                   re-render the HTML report
    datasleuth self-influence --model M --corpus C   sequences the model finds odd
    datasleuth evaluate --recipe digits              LDS and agreement of the estimators
    """
    _quiet_libraries()


def _model_options(f):
    f = click.option("--trust-remote-code", is_flag=True,
                     help="Allow the checkpoint's own Python code to run (off by default).")(f)
    f = click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"]))(f)
    f = click.option("--device", default="cpu", show_default=True,
                     help="torch device, e.g. cuda:0.")(f)
    f = click.option("--attention", is_flag=True,
                     help="Also track attention projections (MLP layers are the default).")(f)
    f = click.option("--layers", multiple=True,
                     help="Glob over module names to track (repeatable); overrides defaults.")(f)
    f = click.option("--model", "model_path", required=True, type=click.Path(),
                     help="Local folder of a Hugging Face causal LM or PEFT adapter.")(f)
    return f


def _corpus_options(f):
    f = click.option("--streaming", is_flag=True,
                     help="Read the corpus files as a stream (no Arrow cache copy on disk), "
                          "for corpora larger than the free disk.")(f)
    f = click.option("--text-field", default="text", show_default=True,
                     help="Field holding the text in JSONL/Parquet/Arrow corpora.")(f)
    f = click.option("--seq-len", default=None, type=click.IntRange(2),
                     help="Tokens per packed training sequence [default: 512, or the "
                          "model's context if shorter].")(f)
    f = click.option("--corpus", "corpus_path", required=True, multiple=True,
                     type=click.Path(), help="JSONL/Parquet/Arrow/text file or folder.")(f)
    f = click.option("--workdir", default="datasleuth-work", show_default=True,
                     type=click.Path(file_okay=False),
                     help="Where packed corpus and factors are kept and reused.")(f)
    return f


def _fit_options(f):
    f = click.option("--max-sequences", type=click.IntRange(1), default=None,
                     help="Fit on at most this many sequences (default: all).")(f)
    f = click.option("--blocks", default=1, show_default=True, type=click.IntRange(1),
                     help="Split each Kronecker factor into this many diagonal blocks.")(f)
    f = click.option("--fisher", default="sampled", show_default=True,
                     type=click.Choice(["sampled", "empirical"]))(f)
    f = click.option("--damping", type=float, default=None,
                     help="Absolute damping (default 0.1 x mean eigenvalue per layer).")(f)
    f = click.option("--curvature", default="ekfac", show_default=True,
                     type=click.Choice(["ekfac", "kfac", "diagonal", "identity"]))(f)
    f = click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1),
                     help="Sequences per batch when fitting and scanning; with many queries "
                          "a larger batch amortizes reading their gradients.")(f)
    return f


def _setup(model_path, layers, attention, dtype, device, trust_remote_code, corpus_path,
           workdir, seq_len, text_field, progress, streaming=False):
    from datasleuth.distributed import local_device
    from datasleuth.lm.model import context_length, default_layers, load_model
    from datasleuth.lm.pipeline import check_context, prepare_corpus

    model, tokenizer = load_model(model_path, dtype=dtype, device=local_device(device),
                                  trust_remote_code=trust_remote_code)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, context_length(model) or DEFAULT_SEQ_LEN)
    check_context(model, seq_len)  # before packing
    tracked = default_layers(model, include=layers or None, attention=attention)
    paths = [Path(p) for p in corpus_path]
    corpus = prepare_corpus(paths if len(paths) > 1 else paths[0], tokenizer, workdir, seq_len,
                            text_field, progress, streaming)
    return model, tokenizer, tracked, corpus


def _fit_config(curvature, damping, fisher, blocks):
    from datasleuth.fitting import FitConfig

    return FitConfig(curvature=curvature, damping=damping, fisher=fisher, blocks=blocks)


@cli.command()
@config_option
@_model_options
@_corpus_options
@_fit_options
@progress_option
def fit(model_path, layers, attention, device, dtype, trust_remote_code, corpus_path, workdir,
        seq_len, text_field, streaming, batch_size, curvature, damping, fisher, blocks,
        max_sequences, progress):
    """Fit curvature factors (EK-FAC by default) for a model on its corpus."""
    model, _, tracked, corpus = _setup(model_path, layers, attention, dtype, device,
                                       trust_remote_code, corpus_path, workdir, seq_len,
                                       text_field, progress, streaming)
    from datasleuth.lm.pipeline import fit_factors

    cfg = _fit_config(curvature, damping, fisher, blocks)
    fit_factors(model, tracked, corpus, workdir, cfg, batch_size, max_sequences, progress)


@cli.command()
@config_option
@_model_options
@_corpus_options
@_fit_options
@click.option("--queries", "queries_path", required=True, type=click.Path(),
              help='JSONL of {"prompt": ..., "completion": ...} lines.')
@click.option("--out", "out_dir", default="datasleuth-out", show_default=True,
              type=click.Path(file_okay=False), help="Folder for results.json and report.html.")
@click.option("--top-k", default=20, show_default=True, type=click.IntRange(1))
@click.option("--bottom-k", default=10, show_default=True, type=click.IntRange(0))
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
def trace(model_path, layers, attention, device, dtype, trust_remote_code, corpus_path,
          workdir, seq_len, text_field, streaming, batch_size, curvature, damping, fisher, blocks,
          max_sequences, queries_path, out_dir, top_k, bottom_k, filter_kind, candidates,
          all_scores, no_report, power_law, rank, index_dir, approximate, rescore, progress):
    """Find the training sequences that made each query's completion more (or less) likely."""
    from datasleuth.lm.pipeline import check_trace_options, fit_factors, run_trace, say
    from datasleuth.lm.queries import load_queries
    from datasleuth.lm.trace import TraceConfig

    queries = load_queries(queries_path)  # fail fast on bad queries, before any heavy work
    candidates_k = candidates if filter_kind == "bm25" else None
    check_trace_options(rank, index_dir, candidates_k, rescore, approximate)
    model, tokenizer, tracked, corpus = _setup(model_path, layers, attention, dtype, device,
                                               trust_remote_code, corpus_path, workdir,
                                               seq_len, text_field, progress, streaming)
    from datasleuth.lm.model import context_length
    from datasleuth.lm.queries import encode_queries

    encode_queries(queries, tokenizer, max_length=context_length(model))  # too long: refuse
    if index_dir is not None:
        from datasleuth.lm.pipeline import open_corpus_index

        open_corpus_index(index_dir, model, corpus)  # refuse a mismatch before fitting
    cfg = _fit_config(curvature, damping, fisher, blocks)
    curv = fit_factors(model, tracked, corpus, workdir, cfg, batch_size, max_sequences, progress)
    tcfg = TraceConfig(top_k=top_k, bottom_k=bottom_k, batch_size=batch_size,
                       power_law=power_law)
    results = run_trace(model, tokenizer, corpus, curv, queries_path, out_dir, tcfg,
                        model_name=str(model_path), corpus_name=", ".join(corpus_path),
                        candidates_k=candidates_k,
                        workdir=workdir, all_scores=all_scores, rank=rank,
                        index=index_dir, rescore=rescore, approximate=approximate,
                        progress=progress)
    from datasleuth.distributed import world

    if world()[0] != 0:
        return
    _print_summary(results)
    if not no_report:
        from datasleuth.report import render_report

        path = render_report(results, Path(out_dir) / "report.html")
        say(f"report: {path}")
    say(f"results: {Path(out_dir) / 'results.json'}")


@cli.command("index")
@config_option
@_model_options
@_corpus_options
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
def index_command(model_path, layers, attention, device, dtype, trust_remote_code, corpus_path,
                  workdir, seq_len, text_field, streaming, out_dir, proj_dim, index_dtype, seed,
                  shard_size, batch_size, fisher, max_sequences, progress):
    """Build a projected-gradient index of the corpus for fast `trace --index` queries."""
    from datasleuth.lm.pipeline import build_corpus_index
    from datasleuth.scale.index import IndexConfig

    model, _, tracked, corpus = _setup(model_path, layers, attention, dtype, device,
                                       trust_remote_code, corpus_path, workdir, seq_len,
                                       text_field, progress, streaming)
    cfg = IndexConfig(k_in=proj_dim, k_out=proj_dim, seed=seed, dtype=index_dtype,
                      shard_size=shard_size)
    build_corpus_index(model, tracked, corpus, out_dir, cfg, batch_size=batch_size,
                       fisher=fisher, max_sequences=max_sequences, progress=progress)


@cli.command("self-influence")
@config_option
@_model_options
@_corpus_options
@_fit_options
@click.option("--out", "out_dir", default="datasleuth-self", show_default=True,
              type=click.Path(file_okay=False),
              help="Folder for self_influence.parquet (all) and .json (top-k).")
@click.option("--top-k", default=20, show_default=True, type=click.IntRange(1))
@progress_option
def self_influence_command(model_path, layers, attention, device, dtype, trust_remote_code,
                           corpus_path, workdir, seq_len, text_field, streaming, batch_size,
                           curvature, damping, fisher, blocks, max_sequences, out_dir, top_k,
                           progress):
    """Rank training sequences by self-influence: candidates for corrupt or odd data."""
    from datasleuth.lm.pipeline import fit_factors, run_self_influence, say

    model, _, tracked, corpus = _setup(model_path, layers, attention, dtype, device,
                                       trust_remote_code, corpus_path, workdir, seq_len,
                                       text_field, progress, streaming)
    cfg = _fit_config(curvature, damping, fisher, blocks)
    curv = fit_factors(model, tracked, corpus, workdir, cfg, batch_size, max_sequences, progress)
    doc = run_self_influence(model, corpus, curv, out_dir, top_k, batch_size, progress)
    from datasleuth.distributed import world

    if world()[0] != 0:
        return
    click.echo(f"\ntop {len(doc['top'])} of {doc['n_sequences']} sequences by self-influence "
               "(loss rank in brackets):")
    for row in doc["top"]:
        text = row["text"].replace("\n", " ")
        click.echo(f"  #{row['rank']:<3} seq {row['index']:<6} {row['self_influence']:+.4g}  "
                   f"[loss #{row['loss_rank']}]  {text[:60]!r}")
    say(f"results: {Path(out_dir) / 'self_influence.json'}, "
        f"{Path(out_dir) / 'self_influence.parquet'}")


def _register_evaluate() -> None:
    from datasleuth.cli_evaluate import evaluate

    cli.add_command(evaluate)


_register_evaluate()


def _print_summary(results: dict[str, Any], width: int = 70) -> None:
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


@cli.command()
@click.argument("results", type=click.Path())
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False),
              help="HTML file to write (default: report.html next to RESULTS).")
def report(results, out_path):
    """Render a self-contained HTML report from a results.json."""
    from datasleuth.report import load_results, render_report

    doc = load_results(results)
    target = Path(out_path) if out_path else Path(results).with_name("report.html")
    click.echo(str(render_report(doc, target)))


@cli.command()
@click.option("--out", "out_dir", default="datasleuth-demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the demo world and report.")
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True)
@progress_option
def demo(out_dir, top_k, seed, progress):
    """Train a small model with planted bad-apple documents and trace them (offline)."""
    from datasleuth.demo import run_demo

    run_demo(out_dir, top_k=top_k, seed=seed, progress=progress)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user errors into one line and exit status 2.

    Under ``torchrun`` (WORLD_SIZE > 1) the processes join one group: fitting and the
    scan are sharded across them, and rank 0 writes the results.
    """
    from datasleuth.distributed import shutdown

    code = _run(argv)
    if code == 0:  # after a failure torchrun stops the other processes; don't wait for them
        shutdown()
    return code


def _run(argv: list[str] | None) -> int:
    from datasleuth.distributed import init_from_environment

    try:
        init_from_environment()
        cli.main(args=argv, prog_name="datasleuth", standalone_mode=False)
    except DatasleuthError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("error: interrupted; re-run the same command to resume", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted; re-run the same command to resume", err=True)
        return 130
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        click.echo(f"error: {e.strerror or e}: {e.filename}; check the path", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
