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
