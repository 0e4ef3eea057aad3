"""Which tests catch which mutation of the adaptive evaluation (issue 23): a Markdown table.

    python tests/mutation_sweep.py [PYTEST ARGS…]   (default: the evaluation's fast test files)

Runs pytest once per mutation of ``tests/mutations.py`` (``CARSO_MUTATION=attack:kind``) and lists the
tests that fail under it; a mutation no test catches is marked. ``test_every_mutation_is_caught`` is
left out (it installs the mutations itself). Takes a few minutes per mutation on 2 CPU cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mutations  # noqa: E402

DEFAULT = [
    "test_mutations.py",
    "test_adaptive_judging.py",
    "test_adaptive.py",
    "test_indicators.py",
    "-m",
    "not slow",
    "-k",
    "not every_mutation",
]


def failures(mutation: str, args: list[str]) -> list[str]:
    env = {**os.environ, "CARSO_MUTATION": mutation}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *args],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    return sorted({m.group(1) for m in re.finditer(r"^FAILED (\S+)", out, re.M)})


def main(argv: list[str]) -> int:
    args = argv or DEFAULT
    print("| mutation | caught by |\n|---|---|")
    missed = 0
    for attack in mutations.ATTACKS:
        for kind in mutations.KINDS:
            found = failures(f"{attack}:{kind}", args)
            missed += not found
            names = ", ".join(f"`{f.split('::', 1)[-1]}`" for f in found) or "**not caught**"
            print(f"| {attack}: {kind} | {names} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
