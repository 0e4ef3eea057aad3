"""``metrics.jsonl``: one JSON line per epoch, rewritten atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carso_cli import checkpoint as ckpt
from carso_cli.errors import CheckpointError


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl`` (the whole file rewritten atomically)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    ckpt.atomic_write_text(path, old + json.dumps(record) + "\n")


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop the lines of epochs ≥ ``epoch`` (a resumed run rewrites them)."""
    if not path.is_file():
        return
    keep = [line for line in read_metrics(path) if line.get("epoch", -1) < epoch]
    ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: not a metrics file (bad JSON line)") from None
    return lines
