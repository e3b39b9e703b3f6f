"""User-facing errors: one sentence that says what is wrong and how to fix it."""

from __future__ import annotations


class DatasleuthError(Exception):
    """An error caused by the user's input or configuration.

    The message is a single line that names the fix. The command line prints it
    as ``error: <message>`` and exits with status 2, without a traceback.
    """


def listed(names: object, limit: int = 3) -> str:
    """Names for a one-line message: the first ``limit`` and how many more."""
    names = [str(n) for n in names]  # type: ignore[attr-defined]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
