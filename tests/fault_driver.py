"""Run ``carso ARGV`` in a child process with one fault injected: the crash and concurrency tests.

    python tests/fault_driver.py FAULT carso-argv...

FAULT is one of
  ``none``                              — no fault;
  ``kill-at-step:N``                    — SIGKILL itself during the N-th training step (counting from 1);
  ``kill-in-write:PATTERN:N``           — SIGKILL itself during the N-th atomic write of a file whose name
                                          matches PATTERN (fnmatch): the temporary file is complete and
                                          fsynced, the rename onto the final name not yet done;
  ``pause-in-write:PATTERN:N:DIR``      — at that moment create DIR/ready and wait until DIR/go exists
                                          (a process caught while it holds a run's lock).
Test code only: the product has no fault hooks.
"""

from __future__ import annotations

import fnmatch
import os
import signal
import sys
import time
from pathlib import Path


def main() -> None:
    fault, argv = sys.argv[1], sys.argv[2:]
    kind, *args = fault.split(":")
    if kind == "kill-at-step":
        from carso_cli import training as tr

        real_reduce, n, steps = tr._all_reduce, int(args[0]), [0]

        def reduce(values, ctx):  # one call per training step
            steps[0] += 1
            if steps[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_reduce(values, ctx)

        tr._all_reduce = reduce
    elif kind in ("kill-in-write", "pause-in-write"):
        real_replace, pattern, n, writes = os.replace, args[0], int(args[1]), [0]

        def replace(src, dst, **kwargs):  # checkpoint.atomic_path's last move
            if fnmatch.fnmatch(Path(dst).name, pattern):
                writes[0] += 1
                if writes[0] == n and kind == "kill-in-write":
                    os.kill(os.getpid(), signal.SIGKILL)
                if writes[0] == n:
                    folder = Path(args[2])
                    (folder / "ready").touch()
                    while not (folder / "go").exists():
                        time.sleep(0.05)
            return real_replace(src, dst, **kwargs)

        os.replace = replace
    elif kind != "none":
        raise SystemExit(f"unknown fault {fault}")
    from carso_cli.cli import main as carso

    sys.argv = ["carso", *argv]
    carso()


if __name__ == "__main__":
    main()
