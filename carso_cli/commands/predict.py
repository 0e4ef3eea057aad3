"""``carso predict``: classify image files with a trained CARSO model (or its classifier alone).

The work is ``carso_cli.prediction.run`` (one loading path with ``carso_cli.load``); this module parses
the options and prints the table (or JSON).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from carso_cli.classnames import label
from carso_cli.commands._common import resolve_device
from carso_cli.commands._options import AGGREGATION_HELP, Aggregation, DataRootOpt, DeviceOpt, RunOpt, SeedOpt
from carso_cli.prediction import PredictAttack, PredictResult, run

SamplesOpt = Annotated[
    int | None,
    typer.Option("--samples", min=0, help="Reconstructions per image (default: the run's; 0 = deterministic)."),
]
SaveReconstructionsOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-reconstructions",
        help=(
            "Write a captioned PNG grid: each input (≥ 128 px) beside its reconstructions, with the true class, "
            "CARSO's and each reconstruction's class."
        ),
    ),
]
LabelOpt = Annotated[
    str | None,
    typer.Option(
        "--label",
        help="Every image's true class (a name or a number); default: the image's "
        "folder name when it is a class name. Shown in the grid and the JSON.",
    ),
]
PredictAttackOpt = Annotated[
    PredictAttack,
    typer.Option(
        "--attack",
        help="pgd: attack each image first (PGD on the classifier at the "
        "preset's ε) to see what purification does; needs the true class (--label or folder).",
    ),
]


def cli(
    images: Annotated[
        list[Path], typer.Argument(help="Image files (PNG, JPEG, …) and/or folders of them.", show_default=False)
    ],
    run_dir: RunOpt = None,
    samples: SamplesOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes shown per image in the table.")] = 3,
    classifier_only: Annotated[
        bool, typer.Option("--classifier-only", help="The classifier's softmax alone, without the purifier.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON array to stdout (notices go to stderr).")
    ] = False,
    save_reconstructions: SaveReconstructionsOpt = None,
    aggregation: Annotated[
        Aggregation | None, typer.Option("--aggregation", help=AGGREGATION_HELP + " (default: the run's).")
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    data_root: DataRootOpt = Path("data"),
    label_: LabelOpt = None,
    attack: PredictAttackOpt = PredictAttack.none,
) -> None:
    """Classify images with a trained CARSO run and show the most likely classes."""
    from rich.markup import escape

    from carso_cli.cli import console, err_console

    result = run(
        images,
        run_dir=run_dir,
        samples=samples,
        aggregation=aggregation.value if aggregation is not None else None,
        classifier_only=classifier_only,
        seed=seed,
        device=resolve_device(device),
        batch_size=batch_size,
        save_reconstructions=save_reconstructions,
        data_root=data_root,
        label_=label_,
        attack=attack.value,
        notify=lambda msg: err_console.print(f"[yellow]note:[/] {escape(msg)}", highlight=False, soft_wrap=True),
    )
    if as_json:
        typer.echo(json.dumps([p.to_json() for p in result.predictions]))
    else:
        console.print(_table(result, top_k))
    if result.reconstructions is not None:
        err_console.print(f"[green]wrote[/] {escape(str(result.reconstructions))}", highlight=False)


def _table(result: PredictResult, top_k: int) -> Any:
    """The ``top_k`` most likely classes of each image, as a rich table."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"carso predict — {escape(str(result.run))}", caption=escape(result.model))
    table.add_column("image")
    table.add_column("#", justify="right")
    table.add_column("class", justify="right")
    table.add_column("label")
    table.add_column("probability", justify="right")
    for pred in result.predictions:
        ranked = sorted(range(len(pred.probabilities)), key=lambda c: -pred.probabilities[c])[:top_k]
        about = escape(pred.image)
        if pred.true_label is not None:
            about += f"\ntrue: {escape(pred.true_label)}"
        if pred.attack is not None:
            before, after = (label(result.names, pred.attack[k]) for k in ("classifier_clean", "classifier_attacked"))
            about += f"\nclassifier: {escape(before)} → {escape(after)} attacked"
        for rank, c in enumerate(ranked):
            table.add_row(
                about if rank == 0 else "",
                str(rank + 1),
                str(c),
                escape(label(result.names, c)),
                f"{pred.probabilities[c]:.4f}",
            )
        table.add_section()
    return table
