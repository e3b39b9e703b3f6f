"""The ``datasleuth`` group, its commands and the entry point that runs them.

Every command accepts ``--config FILE`` (TOML or JSON) whose keys are option names;
options given on the command line win. User errors print one line, ``error: ...``,
and exit with status 2; no traceback.
"""

from __future__ import annotations

import click

from datasleuth.cli.demo import demo
from datasleuth.cli.evaluate import evaluate
from datasleuth.cli.lm import fit, index, self_influence, trace
from datasleuth.cli.report import report
from datasleuth.errors import DatasleuthError

__all__ = ["main", "cli"]


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


for _command in (fit, trace, index, self_influence, report, demo, evaluate):
    cli.add_command(_command)


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
    from datasleuth.progress import interrupts_save

    try:
        init_from_environment()
        with interrupts_save():  # Ctrl-C/SIGTERM: a fit or scan snapshots first, then stops
            cli.main(args=argv, prog_name="datasleuth", standalone_mode=False)
    except DatasleuthError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("error: interrupted; re-run the same command to resume", err=True)
        return 130
    except click.UsageError as e:  # one line, like every other user error
        where = f"datasleuth {e.ctx.info_name} --help" if e.ctx is not None and e.ctx.parent \
            else "datasleuth --help"
        click.echo(f"error: {e.format_message().rstrip('.')}; see `{where}`", err=True)
        return 2
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        click.echo(f"error: {e.strerror or e}: {e.filename}; check the path", err=True)
        return 2
    return 0
