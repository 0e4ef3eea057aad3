"""``carso predict``: classify image files with a trained CARSO model (or its classifier alone).

Each image is read and brought to the model's input (see ``carso_cli.images``), then classified by
the run's CARSO model: N reconstructions from the purifier's decoder, the classifier on each, and the
robust aggregation (section 4.5). The latent samples of image i depend only on (seed, i), not on the
batch it lands in, so ``--batch-size`` never changes an answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import torch
import typer

from carso_cli import api
from carso_cli.aggregation import probabilities
from carso_cli.api import example_latents  # noqa: F401  (also predict's: one definition)
from carso_cli.classnames import label, run_class_names
from carso_cli.commands._common import AGGREGATION_HELP, Aggregation, DataRootOpt, DeviceOpt, RunOpt, SeedOpt, resolve_device
from carso_cli.errors import CarsoError
from carso_cli.images import InputImage, collect_images, load_image, save_grid, to_float


@dataclass
class Prediction:
    image: str
    cls: int
    label: str
    probabilities: list[float]  # all C classes, summing to 1

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "class": self.cls, "label": self.label, "probabilities": self.probabilities}


@dataclass
class PredictResult:
    run: Path
    predictions: list[Prediction]
    model: str  # what produced the probabilities, for the report
    names: list[str] | None  # class names, None when unknown ("class N")
    reconstructions: Path | None = None


def run(
    inputs: list[Path],
    run_dir: Path | None = None,
    samples: int | None = None,
    aggregation: str | None = None,
    classifier_only: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    save_reconstructions: Path | None = None,
    data_root: Path | None = None,
    notify: Callable[[str], None] = lambda _msg: None,
) -> PredictResult:
    """Class probabilities of every image in ``inputs`` (files and folders).

    Args:
        samples / aggregation: override the run's ``inference`` settings (samples 0 = one
            deterministic reconstruction from z = 0).
        classifier_only: the classifier's softmax, without the purifier.
        save_reconstructions: write a PNG grid, one row per image: the input, then its reconstructions.
        notify: receives one line per change made to an input (resized, converted) and other notices.
    """
    if classifier_only and save_reconstructions is not None:
        raise CarsoError("--save-reconstructions needs the purifier: drop --classifier-only")
    if samples is not None and samples < 0:
        raise CarsoError(f"--samples must be ≥ 0 (got {samples})")
    if batch_size < 1:
        raise CarsoError(f"--batch-size must be ≥ 1 (got {batch_size})")
    paths = collect_images(inputs)
    model = api.load(run_dir, samples=samples, aggregation=aggregation, device=device)
    cfg = model.config
    # Decode everything first: an unreadable file stops the command before any compute.
    images: list[InputImage] = [load_image(p, cfg.data.image_size, cfg.data.channels) for p in paths]
    for img in images:
        for note in img.notes:
            notify(f"{img.path}: {note}")
    names = run_class_names(model.run_dir, cfg, data_root, notify)  # stored in the run, else the dataset's

    model.keep_reconstructions = save_reconstructions is not None
    if classifier_only:
        description = "classifier only (no purifier)"
    else:
        n = model.samples
        description = (f"CARSO, {n} reconstructions" if n else "CARSO, 1 deterministic reconstruction (z = 0)") + (
            f", {model.aggregation} aggregation, seed {seed}"
        )
    dev = torch.device(device)
    probs: list[torch.Tensor] = []
    inputs_seen: list[torch.Tensor] = []
    recons: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            x = to_float(torch.stack([img.pixels for img in batch])).to(dev)
            if classifier_only:
                p = torch.softmax(model.classifier(x).float(), dim=-1)
            else:
                z = None
                if model.samples > 0:
                    z = example_latents(seed, range(start, start + len(batch)), model.samples, model.purifier.spec.fjoint)
                    z = z.to(dev)
                p = probabilities(model(x, z).float(), model.aggregation)
                if model.keep_reconstructions and model.last_reconstructions is not None:
                    inputs_seen.append(x.cpu())
                    recons.append(model.last_reconstructions.cpu())
            probs.append(p.double().cpu())
    all_probs = torch.cat(probs)
    predictions = []
    for img, p in zip(images, all_probs):
        cls = int(p.argmax())
        predictions.append(Prediction(str(img.path), cls, label(names, cls), p.tolist()))
    grid = None
    if save_reconstructions is not None:
        grid = save_grid(save_reconstructions, torch.cat(inputs_seen), torch.cat(recons, dim=1))
    return PredictResult(model.run_dir, predictions, description, names, grid)


def cli(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, …) and/or folders of them.", show_default=False)],
    run_dir: RunOpt = None,
    samples: Annotated[
        Optional[int], typer.Option("--samples", min=0, help="Reconstructions per image (default: the run's; 0 = deterministic).")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes shown per image in the table.")] = 3,
    classifier_only: Annotated[
        bool, typer.Option("--classifier-only", help="The classifier's softmax alone, without the purifier.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON array to stdout (notices go to stderr).")
    ] = False,
    save_reconstructions: Annotated[
        Optional[Path], typer.Option("--save-reconstructions", help="Write a PNG grid: each input beside its reconstructions.")
    ] = None,
    aggregation: Annotated[
        Optional[Aggregation], typer.Option("--aggregation", help=AGGREGATION_HELP + " (default: the run's).")
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    data_root: DataRootOpt = Path("data"),
) -> None:
    """Classify images with a trained CARSO run and show the most likely classes."""
    from rich.markup import escape
    from rich.table import Table

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
        notify=lambda msg: err_console.print(f"[yellow]note:[/] {escape(msg)}", highlight=False, soft_wrap=True),
    )
    if as_json:
        typer.echo(json.dumps([p.to_json() for p in result.predictions]))
    else:
        table = Table(title=f"carso predict — {escape(str(result.run))}", caption=escape(result.model))
        table.add_column("image")
        table.add_column("#", justify="right")
        table.add_column("class", justify="right")
        table.add_column("label")
        table.add_column("probability", justify="right")
        for pred in result.predictions:
            ranked = sorted(range(len(pred.probabilities)), key=lambda c: -pred.probabilities[c])[:top_k]
            for rank, c in enumerate(ranked):
                table.add_row(
                    escape(pred.image) if rank == 0 else "",
                    str(rank + 1),
                    str(c),
                    escape(label(result.names, c)),
                    f"{pred.probabilities[c]:.4f}",
                )
            table.add_section()
        console.print(table)
    if result.reconstructions is not None:
        err_console.print(f"[green]wrote[/] {escape(str(result.reconstructions))}", highlight=False)
