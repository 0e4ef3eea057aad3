"""From per-batch records to the results: merged flags, Table 2's columns, re-classification."""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

from carso_cli import __version__


def library_versions() -> dict[str, str]:
    import numpy
    import pyautoattack

    versions = {
        "carso": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyautoattack": getattr(pyautoattack, "__version__", "?"),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


COLUMNS = [
    ("AT/Cl", "classifier_clean"),
    ("C/Cl", "carso_clean"),
    ("AT/AA", "classifier_aa"),
    ("C/randAA", "carso_randaa"),
    ("AT/PGD+EoT", "classifier_pgd_eot"),
    ("PGD+EoT", "carso_pgd_eot"),
    ("C/adaptive", "carso_adaptive"),  # the per-example worst case over the adaptive attacks (issue 8)
]


def summarize(flags: dict[str, list[Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics per Table 2 column, re-classification report) from the merged per-example flags."""
    metrics = {column: accuracy_entry(key, flags[key]) for column, key in COLUMNS if key in flags}
    report: dict[str, Any] = {}
    for name, key in (("clean", "carso_clean"), ("randAA", "carso_randaa"), ("PGD+EoT", "carso_pgd_eot")):
        reps = flags.get(f"{key}_repeats")
        if reps and key in flags:
            report[name] = reclassification(flags[key], reps)
    return metrics, report


def accuracy_entry(key: str, v: list[Any]) -> dict[str, Any]:
    """A metric of results.json: the flags' key, correct, total and accuracy (1 = right / robust)."""
    return {"key": key, "correct": int(sum(v)), "total": len(v), "accuracy": sum(v) / max(len(v), 1)}


def reclassification(single: list[Any], repeats: list[list[Any]]) -> dict[str, Any]:
    """The re-classification report of one attack: ``single`` (N,) the single draw's flags, ``repeats``
    (R, N) the re-classifications'; the worst case is robust only if the single draw and all R are right."""
    t = torch.tensor(repeats, dtype=torch.float64)  # (R, N)
    per_draw = t.mean(dim=1)
    first = torch.tensor(single, dtype=torch.bool)
    worst = first & t.bool().all(dim=0)
    return {
        "single": float(first.double().mean()),
        "mean": float(per_draw.mean()),
        "std": float(per_draw.std(unbiased=True)) if t.shape[0] > 1 else 0.0,
        "worst": float(worst.double().mean()),
        "worst_correct": int(worst.sum()),
        "repeats": int(t.shape[0]),
        "total": int(t.shape[1]),
    }


def merge_records(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Concatenate per-batch flags in example order (``*_repeats``: along the example axis)."""
    records = sorted(records, key=lambda r: r["start"])
    merged: dict[str, list[Any]] = {}
    for r in records:
        for key, value in r["flags"].items():
            if key == "warnings" or isinstance(value, dict):  # per-batch extras, e.g. adaptive_wall_s
                continue
            if key.endswith("_repeats"):
                rows = merged.setdefault(key, [[] for _ in value])
                for row, part in zip(rows, value):
                    row.extend(part)
            else:
                merged.setdefault(key, []).extend(value)
    return merged
