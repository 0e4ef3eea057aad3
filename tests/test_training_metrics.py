"""carso_cli.training.metrics: ``metrics.jsonl`` append, truncate, read."""

from __future__ import annotations

import pytest

from carso_cli import training as tr
from carso_cli.errors import CheckpointError


def test_metrics_append_and_truncate(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    for e in range(4):
        tr.append_metrics(path, {"epoch": e, "loss": 1.0 / (e + 1)})
    tr.truncate_metrics(path, 2)
    assert [r["epoch"] for r in tr.read_metrics(path)] == [0, 1]


def test_metrics_bad_json_line_is_one_clear_error(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    tr.append_metrics(path, {"epoch": 0, "loss": 1.0})
    path.write_text(path.read_text() + "\n{not json\n")  # a blank line is skipped, a broken one is not
    with pytest.raises(CheckpointError) as err:
        tr.read_metrics(path)
    assert str(err.value) == f"{path}: not a metrics file (bad JSON line)"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback
    with pytest.raises(CheckpointError, match="bad JSON line"):
        tr.truncate_metrics(path, 1)  # a resume does not silently drop the file's lines
    assert path.read_text().endswith("{not json\n")
