"""Run folders that cannot be mixed up: one lock per folder, output sets committed together.

* :func:`folder_lock` -- a second run on the same work or output folder waits for the
  first (and says which process holds it) instead of doing all the work twice.
* :class:`OutputSet` -- a run's output files (results and report; a table and its
  summary) are written into a fresh hidden folder, then committed by one atomic write of
  a journal naming them, then moved into place. A run killed before the journal leaves
  the previous run's files untouched; one killed after it is finished by the next run.
* :func:`recover` -- run under the lock when a folder is opened: finishes a committed
  set, removes uncommitted sets and the temporary files of killed runs.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from datasleuth.distributed import world
from datasleuth.errors import DatasleuthError
from datasleuth.storage import check_writable, read_json, replace_durably, write_json

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not serialised there
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "JOURNAL", "OutputSet", "folder_lock", "recover", "locked_run"]

LOCK_NAME = ".datasleuth.lock"
JOURNAL = ".commit.json"
_STAGE_PREFIX = ".pending-"
_HELD: dict[str, int] = {}  # folders this process holds, and how often (re-entrant)

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def folder_lock(folder: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Hold ``folder``'s lock (``.datasleuth.lock``, holding the owner's pid) for the block.

    When another process holds it, say so and wait (``wait``), or refuse naming its
    pid. On entry the folder is :func:`recover`-ed. Re-entrant within one process.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _HELD or fcntl is None:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    created = not folder.exists()
    fd = _open_locked(folder, wait)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = 1
        recover(folder, temporary=world()[1] == 1)  # other ranks may be writing
        yield
    finally:
        _HELD.pop(key, None)
        if created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            with suppress(OSError):  # a run that wrote nothing leaves no folder
                (folder / LOCK_NAME).unlink()
                folder.rmdir()
        os.close(fd)  # releases the lock


def _open_locked(folder: Path, wait: bool) -> int:
    """A descriptor of ``folder``'s lock file, locked; retried when the holder removed the
    file (and its empty folder) while this process waited."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _acquire(fd, folder, wait)
            if os.fstat(fd).st_ino == os.stat(folder / LOCK_NAME).st_ino:
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _acquire(fd: int, folder: Path, wait: bool) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    if not wait:
        raise DatasleuthError(f"{folder} is in use by process {holder}; wait for it to finish "
                              "or give another folder")
    print(f"waiting for process {holder}, which is using {folder}", file=sys.stderr,
          flush=True)
    fcntl.flock(fd, fcntl.LOCK_EX)


def locked_run(*attributes: str) -> Callable[[F], F]:
    """Decorate a workflow function so it runs holding the locks of the folders named by
    ``"argument.attribute"`` paths (e.g. ``"load.workdir"``, ``"options.out"``); only
    rank 0 of a torchrun group locks."""
    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
            bound = {**dict(zip(names, args)), **kwargs}
            with ExitStack() as stack:
                for path in attributes:
                    arg, attr = path.split(".")
                    folder = getattr(bound.get(arg), attr, None)
                    if folder is not None and world()[0] == 0:
                        check_writable(folder, f"--{attr}")  # before the lock makes it
                        stack.enter_context(folder_lock(folder))
                return fn(*args, **kwargs)
        return run  # type: ignore[return-value]
    return decorate


class OutputSet:
    """Output files of one run in ``folder``, committed together (see the module).

    Write each file at :meth:`path` (any writer; atomic or not), then :meth:`commit`.
    As a context manager it commits on success and discards the set on an exception.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=self.folder))

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` of this set."""
        return self.stage / name

    def commit(self) -> None:
        """Make every file of the set the folder's, all together (the journal is the
        commit point: written atomically, then the files are moved into place)."""
        names = sorted(p.name for p in self.stage.iterdir() if p.is_file()
                       and not p.name.startswith("."))
        write_json(self.folder / JOURNAL, {"stage": self.stage.name, "files": names})
        _replay(self.folder)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()


def recover(folder: str | os.PathLike, temporary: bool = True) -> None:
    """Finish a committed output set, then remove uncommitted sets and the temporary
    files (``.NAME.XXXX.tmp``) and packing folders (``.packing-*``) of killed runs, in
    ``folder`` and its direct subfolders (``temporary=False``: only the first step).
    Call it only holding the folder's lock."""
    folder = Path(folder)
    _replay(folder)
    if not temporary:
        return
    for where in [folder] + [d for d in folder.iterdir() if d.is_dir()
                             and not d.name.startswith(".")]:
        for path in list(where.glob(f"{_STAGE_PREFIX}*")) + list(where.glob(".packing-*")):
            shutil.rmtree(path, ignore_errors=True)
        for path in where.glob(".*.tmp"):
            path.unlink(missing_ok=True)


def _replay(folder: Path) -> None:
    """Move the files of a committed set (named by the journal) into place."""
    journal = folder / JOURNAL
    if not journal.is_file():
        return
    try:
        plan = read_json(journal)
    except DatasleuthError:  # a journal is written atomically: unreadable means edited
        plan = {}
    stage = folder / str(plan.get("stage", ""))
    for name in plan.get("files", []):
        if stage.name.startswith(_STAGE_PREFIX) and (stage / name).is_file():
            replace_durably(stage / name, folder / name)
    journal.unlink()
    if stage.name.startswith(_STAGE_PREFIX):
        shutil.rmtree(stage, ignore_errors=True)
