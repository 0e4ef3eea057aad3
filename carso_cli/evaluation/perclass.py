"""Per-class accuracy of an evaluation: Table 2's columns (clean and robust, classifier and CARSO) per class.

Robustness is rarely uniform across classes, so ``results.json`` keeps, beside the overall columns, one
row per class present among the evaluated examples; ``carso plot RUN/eval/NAME`` draws it. Pure
functions of the merged per-example flags, the examples' labels and the class names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carso_cli.classnames import label, stored_class_names
from carso_cli.evaluation.report import COLUMNS


def labels_of(records: Sequence[dict[str, Any]]) -> list[int] | None:
    """The examples' labels in example order, from the per-batch records; None when a record has none
    (a batch computed before labels were kept, found by ``--resume``)."""
    ordered = sorted(records, key=lambda r: r["start"])
    if not ordered or any("labels" not in r for r in ordered):
        return None
    return [int(v) for r in ordered for v in r["labels"]]


def class_names_of(run: Path | None, dataset: Any) -> list[str] | None:
    """The names the run stored, else the dataset's own ``classes`` (torchvision and carso datasets)."""
    names = stored_class_names(run) if run is not None else None
    if names is None:
        classes = getattr(dataset, "classes", None)
        if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
            names = list(classes)
    return names


def per_class(flags: dict[str, list[Any]], labels: Sequence[int], names: Sequence[str] | None) -> dict[str, Any]:
    """Per-class accuracy of every Table 2 column in ``flags``.

    Args:
        flags: merged per-example flags (column key → N values, 1 = right / robust), as ``merge_records``.
        labels: (N,) the examples' true classes.
        names: class names by index (None: "class N").
    Returns:
        ``{"columns": [column, …], "classes": [{"class", "name", "total", "correct": {column: k},
        "accuracy": {column: k / total}}, …]}``, one entry per class with at least one example, by index.
    """
    n = len(labels)
    columns = [(column, key) for column, key in COLUMNS if key in flags and len(flags[key]) == n]
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    rows = []
    for c in sorted(by_class):
        idx = by_class[c]
        correct = {column: sum(1 for i in idx if flags[key][i] == 1) for column, key in columns}
        rows.append(
            {
                "class": c,
                "name": label(list(names) if names is not None else None, c),
                "total": len(idx),
                "correct": correct,
                "accuracy": {column: k / len(idx) for column, k in correct.items()},
            }
        )
    return {"columns": [column for column, _ in columns], "classes": rows}


def per_class_section(
    records: Sequence[dict[str, Any]], flags: dict[str, list[Any]], run: Path | None, dataset: Any
) -> dict[str, Any] | None:
    """``results.json``'s ``per_class``: None when some batch's labels were not kept."""
    labels = labels_of(records)
    if labels is None:
        return None
    return per_class(flags, labels, class_names_of(run, dataset))
