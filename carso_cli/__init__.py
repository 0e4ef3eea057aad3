"""carso: the CARSO adversarial defence (adversarial training + representation-conditional
purification + robust aggregation) as a command-line tool and a small Python API.

``carso_cli.load(run)`` / ``carso_cli.load_classifier(run)`` (see ``carso_cli.api``) are imported on
first use, so that ``import carso_cli`` (and ``carso --help``) does not pay for importing torch.
"""

from typing import Any

from carso_cli.errors import CarsoError

__version__ = "0.1.0"
__all__ = ["CarsoError", "load", "load_classifier"]


def __getattr__(name: str) -> Any:
    if name in ("load", "load_classifier"):
        from carso_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'carso_cli' has no attribute {name!r}")
