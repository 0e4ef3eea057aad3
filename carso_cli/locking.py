"""One writer per run directory: an OS lock on ``DIR/.carso.lock``, held for a command's life.

Every command that writes into a run (training, eval, demo) takes it first; a second writer is
refused before it changes anything, with the holder's pid and host (written into the lock file). The
lock is ``flock``: the OS releases it when the holding process dies, even by SIGKILL, so a killed run
never leaves a stale lock, and the lock file itself is left in place (removing it would let two
processes lock two different files). Read-only commands take no lock. On network file systems
``flock`` may be emulated or ignored (older NFS, some FUSE mounts): there the lock does not protect.

Written with ``fcntl`` rather than the ``filelock`` package: we need a refusal that names the holder,
which means writing pid and host into the locked file, and no waiting.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from carso_cli.errors import CarsoError

LOCK_FILE = ".carso.lock"


class LockedError(CarsoError):
    """Another process holds the run's lock."""


def holder(lock_path: Path) -> str:
    """'pid P on host H' from a lock file (or 'an unknown process')."""
    try:
        info = json.loads(lock_path.read_text() or "{}")
        return f"pid {info['pid']} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


# Locks this process holds (path → depth): ``carso demo`` holds its run's lock while the training it
# calls in-process takes it again; a second ``flock`` from this process would refuse itself.
_held: dict[Path, int] = {}


@contextmanager
def hold(
    directory: str | Path, hint: str = "wait for it, or use another --out", lock_file: str = LOCK_FILE
) -> Iterator[Path]:
    """Hold the exclusive lock ``directory/lock_file`` (the directory is created if missing).

    Raises ``LockedError`` at once if another process holds it; re-entrant within one process. In a
    multi-process run, call it on rank 0 only.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / lock_file).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield path
        finally:
            _held[path] -= 1
        return
    with open(path, "a+") as fh:  # closing the descriptor releases the flock
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{directory} is in use by another carso process ({holder(path)}): {hint}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv[1:]}) + "\n")
        fh.flush()
        _held[path] = 1
        try:
            yield path
        finally:
            del _held[path]
