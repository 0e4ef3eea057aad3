"""``carso extract``: save the classifier's representation (clean and, optionally, attacked) to safetensors.

The work and the file layout are ``carso_cli.extraction``; this module parses the options and prints
the per-layer table.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from carso_cli.commands._common import load_preset, resolve_device
from carso_cli.commands._options import (
    ClassifierOpt,
    ClassifierWeightsOpt,
    DataRootOpt,
    DeviceOpt,
    RunOpt,
    SeedOpt,
    SetOpt,
)
from carso_cli.display import format_eps
from carso_cli.extraction import ExtractResult, Perturbation, classifier_options, parse_layers
from carso_cli.extraction import run as extract


class Split(str, Enum):
    train = "train"
    test = "test"


LayersOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--layers",
        help=("Layer names, comma-separated or repeated, or rule:NAME (default: the preset's representation layers)."),
    ),
]


def cli(
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file.")],
    run: RunOpt = None,
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="Preset (with its --classifier) instead of a run.")
    ] = None,
    classifier: ClassifierOpt = None,
    classifier_weights: ClassifierWeightsOpt = None,
    set_: SetOpt = None,
    split: Annotated[Split, typer.Option("--split", help="Dataset split.")] = Split.test,
    n_examples: Annotated[int | None, typer.Option("--n-examples", help="First N examples of the split.")] = 256,
    attack: Annotated[
        Perturbation, typer.Option("--attack", help="Perturb the inputs with FGSM or PGD (the preset's settings).")
    ] = Perturbation.none,
    eps: Annotated[str | None, typer.Option("--eps", help="ℓ∞ radius, e.g. 8/255 (default: the preset's).")] = None,
    layers: LayersOpt = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32, float16 or bfloat16 for the representation tensors.")
    ] = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 128,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    data_root: DataRootOpt = Path("data"),
) -> None:
    """Save the classifier's representation (one tensor per layer), inputs, labels, and attacked inputs."""
    from carso_cli.cli import console

    set_, classifier = classifier_options(run, preset, set_, classifier, classifier_weights)  # as train-purifier
    result = extract(
        out,
        run_dir=run,
        cfg=load_preset(preset, set_) if preset is not None else None,
        classifier=classifier,
        split=split.value,
        n_examples=n_examples,
        attack=attack.value,
        eps=eps,
        layers=parse_layers(layers),
        dtype=dtype,
        batch_size=batch_size,
        seed=seed,
        device=resolve_device(device),
        data_root=data_root,
        console=console,
    )
    render(result, console)


def render(result: ExtractResult, console: Console) -> None:
    attacked = result.attack != "none"
    title = f"representation: {len(result.layers)} layers, {result.n} examples"
    if attacked:
        title += f" — {result.attack} at ε = {format_eps(result.eps or 0.0)}"
    t = Table(title=title)
    t.add_column("#", justify="right")
    t.add_column("layer")
    t.add_column("shape (N×C×H×W)")
    if attacked:
        t.add_column("mean relative L2 change", justify="right")
    for i, row in enumerate(result.layers):
        cells = [str(i), escape(row.name), "×".join(map(str, (result.n, *row.shape)))]
        if attacked:
            cells.append(f"{row.relative_change:.4f}")
        t.add_row(*cells)
    console.print(t)
    acc = f"classifier accuracy: clean {100 * result.clean_accuracy:.2f}%"
    if result.adversarial_accuracy is not None:
        acc += f", attacked {100 * result.adversarial_accuracy:.2f}%"
    console.print(acc)
    console.print(f"saved {result.path} ({result.bytes / 2**20:.1f} MiB)", highlight=False, markup=False)
