"""carso_cli.training.metrics: ``metrics.jsonl`` append, truncate, read."""

from __future__ import annotations

from carso_cli import training as tr


def test_metrics_append_and_truncate(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    for e in range(4):
        tr.append_metrics(path, {"epoch": e, "loss": 1.0 / (e + 1)})
    tr.truncate_metrics(path, 2)
    assert [r["epoch"] for r in tr.read_metrics(path)] == [0, 1]
