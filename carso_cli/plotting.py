"""Figures (PNG, written atomically): a run's loss and learning-rate curves from its ``metrics.jsonl``, and
an evaluation's per-class accuracy from its ``results.json``. What ``carso plot`` draws.

The training commands call ``plot_metrics`` at their end; ``carso plot RUN`` redraws the figure at any
time (also while a run is still training). Matplotlib uses the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from carso_cli import checkpoint as ckpt
from carso_cli.errors import CarsoError

# Per-example losses drawn on the left panel, when present (purifier: loss, bce, kl; classifier: loss).
LOSS_KEYS = ("loss", "bce", "kl")


def metrics_file(target: Path) -> Path:
    """``target`` itself if it is a metrics file, else ``target/metrics.jsonl``."""
    path = target / ckpt.METRICS_FILE if target.is_dir() else target
    if not path.is_file():
        raise CarsoError(f"no metrics file at {path} (give a run directory or a .jsonl file)")
    return path


def plot_metrics(path: Path, out: Path, title: str | None = None) -> Path:
    """Draw the curves of ``path`` (metrics.jsonl) into ``out`` (PNG, written atomically).

    Left: per-example losses by epoch (log scale when all positive). Right: learning rate (log scale)
    and, when logged, β and training accuracy on a linear axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from carso_cli.training import read_metrics

    records: list[dict[str, Any]] = read_metrics(path)
    if not records:
        raise CarsoError(f"{path} has no epochs yet")
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key in LOSS_KEYS:
        values = [r.get(key) for r in records]
        if all(v is not None for v in values):
            ax_loss.plot(epochs, values, marker="o", ms=3, label=key)
    if all(v > 0 for line in ax_loss.get_lines() for v in line.get_ydata()):
        ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("per-example loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if all("lr" in r for r in records):
        ax_lr.plot(epochs, [r["lr"] for r in records], color="tab:red", marker="o", ms=3, label="LR")
        if all(r["lr"] > 0 for r in records):
            ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate", color="tab:red")
    ax_lr.set_xlabel("epoch")
    ax_lr.grid(alpha=0.3)
    other = ax_lr.twinx()
    for key, colour in (("beta", "tab:blue"), ("accuracy", "tab:green")):
        if all(key in r for r in records):
            other.plot(epochs, [r[key] for r in records], color=colour, marker="s", ms=3, label=key)
    other.set_ylim(-0.05, 1.05)
    if other.get_lines():
        other.legend(loc="center right")
    fig.suptitle(title or str(path.parent))
    fig.tight_layout()
    with ckpt.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


RESULTS_FILE = "results.json"  # an evaluation's (evaluation/store.py), read here without importing the attacks
PER_CLASS_FILE = "per_class.png"
BARS_UP_TO = 20  # classes drawn as grouped bars; more (CIFAR-100, TinyImageNet) as a heat map


def read_per_class(results_path: Path) -> dict[str, Any]:
    """The ``per_class`` section of an evaluation's results, or a CarsoError saying why there is none."""
    import json

    try:
        results = json.loads(results_path.read_text())
    except (OSError, ValueError) as err:
        raise CarsoError(f"cannot read {results_path}: {err}") from None
    table = results.get("per_class") if isinstance(results, dict) else None
    if not table or not table.get("classes"):
        raise CarsoError(
            f"{results_path} has no per-class accuracy (an evaluation made before carso kept the "
            "examples' labels): run the evaluation again"
        )
    return table


def plot_per_class(table: dict[str, Any], out: Path, title: str) -> Path:
    """Draw per-class accuracy (one bar per Table 2 column and class, or a heat map) into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    rows, columns = table["classes"], table["columns"]
    names = [f"{r['name']} ({r['total']})" for r in rows]
    acc = np.array([[r["accuracy"][c] for c in columns] for r in rows], dtype=float)  # (classes, columns)
    if len(rows) <= BARS_UP_TO:
        fig, ax = plt.subplots(figsize=(9, 1.2 + 0.25 * len(rows) * max(len(columns), 2)))
        height = 0.8 / len(columns)
        for j, column in enumerate(columns):
            ax.barh(
                np.arange(len(rows)) + (j - (len(columns) - 1) / 2) * height, acc[:, j], height=height, label=column
            )
        ax.set_yticks(np.arange(len(rows)), names)
        ax.invert_yaxis()  # class 0 at the top
        ax.set_xlim(0, 1)
        ax.set_xlabel("accuracy (examples per class in brackets)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # beside the bars, never on them
        ax.grid(axis="x", alpha=0.3)
    else:
        fig, ax = plt.subplots(figsize=(min(4 + 0.12 * len(rows), 30), 1.5 + 0.5 * len(columns)))
        image = ax.imshow(acc.T, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_yticks(np.arange(len(columns)), columns)
        step = max(1, len(rows) // 50)
        ax.set_xticks(np.arange(0, len(rows), step), [r["name"] for r in rows][::step], rotation=90, fontsize="x-small")
        fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title)
    fig.tight_layout()
    with ckpt.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out
