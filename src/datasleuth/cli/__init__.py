"""The ``datasleuth`` command line: fit, trace, index, self-influence, report, evaluate, demo.

* :mod:`~datasleuth.cli.main` -- the group, the entry point :func:`main` and its errors;
* :mod:`~datasleuth.cli.options` -- options shared by the commands and ``--config`` files;
* :mod:`~datasleuth.cli.lm` -- ``fit``, ``trace``, ``index``, ``self-influence``: parse,
  call :mod:`datasleuth.lm.workflow`, print;
* :mod:`~datasleuth.cli.evaluate`, :mod:`~datasleuth.cli.report`,
  :mod:`~datasleuth.cli.demo` -- one command each.

``python -m datasleuth.cli`` (and ``torchrun ... -m datasleuth.cli``) runs :func:`main`.
"""

from datasleuth.cli.main import cli, main

__all__ = ["main", "cli"]
