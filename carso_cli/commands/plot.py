"""``carso plot``: loss and learning-rate curves (PNG) from a run's ``metrics.jsonl``.

Training commands call ``plot_metrics`` at their end; ``carso plot RUN`` redraws the figure at any time
(also while a run is still training). Matplotlib uses the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from carso_cli import checkpoint as ckpt
from carso_cli.errors import CarsoError

# Per-example losses drawn on the left panel, when present (purifier: loss, bce, kl; classifier: loss).
LOSS_KEYS = ("loss", "bce", "kl")
SCHEDULE_KEYS = ("lr", "beta", "accuracy")


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


def cli(
    target: Annotated[Path, typer.Argument(help="Run directory (or a metrics .jsonl file).")],
    out: Annotated[Optional[Path], typer.Option("--out", help="PNG to write (default: curves.png beside the metrics).")] = None,
) -> None:
    """Draw a run's loss and learning-rate curves into a PNG."""
    from carso_cli.cli import console

    path = metrics_file(target)
    default = path.parent / ("curves.png" if path.name == ckpt.METRICS_FILE else path.stem + ".png")
    written = plot_metrics(path, out or default, title=str(target))
    console.print(str(written), soft_wrap=True, highlight=False, markup=False)
