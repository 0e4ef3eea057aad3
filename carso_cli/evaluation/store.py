"""The resumable results store: one atomic ``batch-NNNNN.json`` per batch with the settings it was
computed with; ``resume`` skips the batches already on disk (refusing ones made with other settings).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carso_cli import checkpoint as ckpt
from carso_cli.errors import CarsoError

RESULTS_FORMAT = "carso-eval/1"
RESULTS_FILE = "results.json"
SETTINGS_FILE = "settings.json"


class ResultsStore:
    """``DIR/batch-NNNNN.json`` per batch (atomic), ``DIR/settings.json``, ``DIR/results.json``."""

    def __init__(self, directory: Path, settings: dict[str, Any], resume: bool) -> None:
        self.dir = Path(directory)
        self.settings = settings
        self.resume = resume

    def batch_path(self, k: int) -> Path:
        return self.dir / f"batch-{k:05d}.json"

    def check(self) -> None:
        """With ``resume``: refuse a directory whose results were made with other settings."""
        path = self.dir / SETTINGS_FILE
        if self.resume and path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise CarsoError(f"{path} is unreadable ({err}); start again without --resume") from None
            if stored != self.settings:
                raise self._mismatch(stored)

    def _mismatch(self, stored: dict[str, Any]) -> CarsoError:
        diff = [k for k in sorted(set(stored) | set(self.settings)) if stored.get(k) != self.settings.get(k)]
        shown = ", ".join(f"{k}: {stored.get(k)!r} → {self.settings.get(k)!r}" for k in diff[:4])
        return CarsoError(
            f"{self.dir} holds results made with other settings ({shown}); use another --name, "
            "or drop --resume to overwrite them"
        )

    def prepare(self) -> None:
        """Main process: create the directory; without ``resume`` clear earlier results."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            for old in [*self.dir.glob("batch-*.json"), self.dir / RESULTS_FILE]:
                old.unlink(missing_ok=True)
        ckpt.atomic_write_json(self.dir / SETTINGS_FILE, self.settings)

    def load(self, k: int) -> dict[str, Any] | None:
        """A finished batch's record (with ``resume``), None when it must be computed."""
        path = self.batch_path(k)
        if not self.resume or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # cannot happen with atomic writes, but a damaged file is just redone
        if record.get("settings") != self.settings:
            raise self._mismatch(record.get("settings") or {})
        return record

    def save(self, k: int, record: dict[str, Any]) -> None:
        ckpt.atomic_write_text(self.batch_path(k), dumps_compact(record))


def dumps_compact(obj: Any) -> str:
    """JSON with indentation, but lists of numbers/booleans on one line (per-example flags)."""

    def enc(o: Any, depth: int) -> str:
        pad, inner = "  " * depth, "  " * (depth + 1)
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{inner}{json.dumps(str(k))}: {enc(v, depth + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in o):
                return "[" + ", ".join(json.dumps(v) for v in o) + "]"
            return "[\n" + ",\n".join(inner + enc(v, depth + 1) for v in o) + "\n" + pad + "]"
        return json.dumps(o)

    return enc(obj, 0) + "\n"
