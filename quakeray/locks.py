"""Advisory file locks: one process at a time in a run folder, or creating a store.

Both are ``flock`` locks on a small file, which the OS releases when the holder exits,
killed or not: a crash never leaves anything locked, and nothing has to tell a stale
lock from a live one. They hold on one machine and on shared file systems that support
``flock`` (local disks, NFSv4); on an object store (``s3://``) there is nothing to lock.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with held(folder, what="run folder", instead="choose another run.name"):
    ...     pass  # a second process here gets a BusyError naming this one
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from quakeray import storage
from quakeray.errors import BusyError

__all__ = ["LOCK_FILE", "claimed", "held", "waited_for"]

LOCK_FILE = ".quakeray.lock"
"""The lock file :func:`held` keeps in a folder (it names its holder)."""


@contextlib.contextmanager
def held(folder: str | Path, *, what: str, instead: str) -> Iterator[None]:
    """Hold ``folder`` for this process, or fail at once if another process holds it.

    Args:
        folder: A local folder (created if missing).
        what: What the folder is, for the message ("run folder").
        instead: What the user can do, for the message ("choose another run.name").

    A folder this made and that holds nothing but the lock when the block ends (a run
    refused by a later check) is removed again, with the parents made for it.

    Raises:
        BusyError: Another live process holds it (named with its pid and host).
    """
    path = Path(folder).absolute()
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(path, what=what, instead=instead):
            yield
    finally:
        if made and [p.name for p in path.iterdir()] == [LOCK_FILE]:
            (path / LOCK_FILE).unlink(missing_ok=True)
            for folder_made in made:
                with contextlib.suppress(OSError):  # not empty: someone else's now
                    folder_made.rmdir()


@contextlib.contextmanager
def _locked(path: Path, *, what: str, instead: str) -> Iterator[None]:
    with open(path / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise BusyError(
                f"{what} {path} is in use by {holder}; wait for it to end or {instead}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def claimed(location: str, *, what: str, instead: str) -> contextlib.AbstractContextManager[None]:
    """:func:`held` for a folder on this machine's disk (or a mount); nothing on ``s3://``.

    An object store has no locks: there, unique generated names keep runs apart.
    """
    if storage.is_remote(location):
        return contextlib.nullcontext()
    return held(storage.local_path(location), what=what, instead=instead)


@contextlib.contextmanager
def waited_for(lock_file: str | Path) -> Iterator[None]:
    """Hold ``lock_file`` exclusively, waiting for whoever holds it now."""
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
