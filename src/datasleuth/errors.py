"""User-facing errors: one sentence that says what is wrong and how to fix it."""

from __future__ import annotations


class DatasleuthError(Exception):
    """An error caused by the user's input or configuration.

    The message is a single line that names the fix. The command line prints it
    as ``error: <message>`` and exits with status 2, without a traceback.
    """
