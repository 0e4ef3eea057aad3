"""``carso plot``: loss and learning-rate curves (PNG) from a run's ``metrics.jsonl``, or an evaluation's
per-class accuracy (``carso plot RUN/eval/NAME``, from its ``results.json``).

The figures are drawn by ``carso_cli.plotting``; this module picks which from the target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from carso_cli import checkpoint as ckpt
from carso_cli.plotting import PER_CLASS_FILE, RESULTS_FILE, metrics_file, plot_metrics, plot_per_class, read_per_class


def cli(
    target: Annotated[
        Path, typer.Argument(help="Run directory (or a metrics .jsonl file), or an evaluation's RUN/eval/NAME.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="PNG to write (default: curves.png beside the metrics, per_class.png in an evaluation)."
        ),
    ] = None,
) -> None:
    """Draw a run's loss and learning-rate curves, or an evaluation's per-class accuracy, into a PNG."""
    from carso_cli.cli import console

    results = target / RESULTS_FILE if target.is_dir() else target
    if results.name == RESULTS_FILE and results.is_file():
        written = plot_per_class(
            read_per_class(results),
            out or results.parent / PER_CLASS_FILE,
            title=f"per-class accuracy — {results.parent}",
        )
        console.print(str(written), soft_wrap=True, highlight=False)
        return
    path = metrics_file(target)
    default = path.parent / ("curves.png" if path.name == ckpt.METRICS_FILE else path.stem + ".png")
    written = plot_metrics(path, out or default, title=str(target))
    console.print(str(written), soft_wrap=True, highlight=False, markup=False)
