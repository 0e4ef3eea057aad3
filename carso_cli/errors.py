"""The one exception type library code raises for user-facing problems.

Library code raises a ``CarsoError`` (or a subclass); only the CLI layer turns it into one red line
and a non-zero exit. Anything else reaching the CLI is a bug and is reported as such.
"""

from __future__ import annotations


class CarsoError(Exception):
    """A problem the user can fix: bad path, preset, checkpoint or option value."""


class ConfigError(CarsoError):
    """A preset or override is invalid (unknown key, wrong type, bad value)."""


class CheckpointError(CarsoError):
    """A weights or run file is missing, truncated, foreign or does not match the model."""


class DataError(CarsoError):
    """A dataset or input file is missing or unreadable."""


class TrainingError(CarsoError):
    """Training cannot go on (e.g. a non-finite loss)."""


class DiskWriteError(CarsoError):
    """A write failed midway (disk full, read-only or forbidden directory); nothing partial was left."""


def reason(exc: BaseException) -> str:
    """A non-empty reason for any exception: its message, else its type's name (``EOFError()`` has no text)."""
    text = str(exc).strip()
    return text if text else type(exc).__name__
