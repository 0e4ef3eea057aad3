"""``carso predict``: classify image files with a trained CARSO model (or its classifier alone).

Each image is read and brought to the model's input (see ``carso_cli.images``), then classified by
the run's CARSO model: N reconstructions from the purifier's decoder, the classifier on each, and the
robust aggregation (section 4.5). The latent samples of image i depend only on (seed, i), not on the
batch it lands in, so ``--batch-size`` never changes an answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from carso_cli import api
from carso_cli.aggregation import aggregate, probabilities
from carso_cli.api import example_latents  # noqa: F401  (also predict's: one definition)
from carso_cli.classnames import label, run_class_names, true_classes
from carso_cli.commands._common import (
    AGGREGATION_HELP,
    Aggregation,
    DataRootOpt,
    DeviceOpt,
    RunOpt,
    SeedOpt,
    resolve_device,
)
from carso_cli.errors import CarsoError
from carso_cli.images import Grid, InputImage, collect_images, load_image, reconstruction_rows, save_grid, to_float


class PredictAttack(str, Enum):
    none = "none"
    pgd = "pgd"


@dataclass
class Prediction:
    image: str
    cls: int
    label: str
    probabilities: list[float]  # all C classes, summing to 1
    true_cls: int | None = None  # from --label or the image's folder name; None: unknown
    true_label: str | None = None
    attack: dict[str, Any] | None = None  # with --attack: what the classifier said before and after

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "image": self.image,
            "class": self.cls,
            "label": self.label,
            "probabilities": self.probabilities,
        }
        if self.true_cls is not None:
            out.update(true_class=self.true_cls, true_label=self.true_label)
        if self.attack is not None:
            out["attack"] = self.attack
        return out


@dataclass
class PredictResult:
    run: Path
    predictions: list[Prediction]
    model: str  # what produced the probabilities, for the report
    names: list[str] | None  # class names, None when unknown ("class N")
    reconstructions: Path | None = None
    grid: Grid | None = None


def _eps_text(eps: float) -> str:
    k = round(eps * 255)
    return f"{k}/255" if abs(k / 255 - eps) < 1e-9 else f"{eps:g}"


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
    label_: str | None = None,
    attack: str = "none",
) -> PredictResult:
    """Class probabilities of every image in ``inputs`` (files and folders).

    Args:
        samples / aggregation: override the run's ``inference`` settings (samples 0 = one
            deterministic reconstruction from z = 0).
        classifier_only: the classifier's softmax, without the purifier.
        save_reconstructions: write a captioned PNG grid, one row per image: the input (and its attacked
            version), then its reconstructions, with the true class, CARSO's and each reconstruction's class.
        notify: receives one line per change made to an input (resized, converted) and other notices.
        label_: every image's true class (a name or a number); default: the image's folder name, when
            it is a class name.
        attack: "pgd" attacks each image first: PGD on the classifier (the preset's ε, steps and step
            size, as the purifier's training attacks), to show what purification does; the predictions
            are then those of the attacked images. It needs every image's true class.
    """
    if classifier_only and save_reconstructions is not None:
        raise CarsoError("--save-reconstructions needs the purifier: drop --classifier-only")
    if samples is not None and samples < 0:
        raise CarsoError(f"--samples must be ≥ 0 (got {samples})")
    if batch_size < 1:
        raise CarsoError(f"--batch-size must be ≥ 1 (got {batch_size})")
    if attack not in ("none", "pgd"):
        raise CarsoError(f"unknown attack '{attack}' (none or pgd)")
    paths = collect_images(inputs)
    model = api.load(run_dir, samples=samples, aggregation=aggregation, device=device)
    cfg = model.config
    # Decode everything first: an unreadable file stops the command before any compute.
    images: list[InputImage] = [load_image(p, cfg.data.image_size, cfg.data.channels) for p in paths]
    for img in images:
        for note in img.notes:
            notify(f"{img.path}: {note}")
    names = run_class_names(model.run_dir, cfg, data_root, notify)  # stored in the run, else the dataset's
    truth = true_classes(paths, names, label_, cfg.data.num_classes)
    if attack != "none" and any(t is None for t in truth):
        missing = next(p for p, t in zip(paths, truth) if t is None)
        raise CarsoError(
            f"--attack {attack} needs each image's true class, and {missing} has none: give --label "
            "CLASS, or keep the images in folders named after their classes (e.g. cat/1.png)"
        )

    model.keep_reconstructions = save_reconstructions is not None
    if classifier_only:
        description = "classifier only (no purifier)"
    else:
        n = model.samples
        description = (f"CARSO, {n} reconstructions" if n else "CARSO, 1 deterministic reconstruction (z = 0)") + (
            f", {model.aggregation} aggregation, seed {seed}"
        )
    a = cfg.attacks
    if attack != "none":
        description += f"; inputs attacked by PGD on the classifier (ε = {_eps_text(a.eps)}, {a.pgd_steps} steps)"
    dev = torch.device(device)
    probs: list[torch.Tensor] = []
    seen: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("clean", "attacked", "recons", "recon_cls", "cls_clean", "cls_adv")
    }
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            x = to_float(torch.stack([img.pixels for img in batch])).to(dev)
            if attack != "none":
                y = torch.tensor(truth[start : start + len(batch)], device=dev)
                x_adv = _attack(model.classifier, x, y, a, seed, start)
                seen["clean"].append(x.cpu())
                seen["cls_clean"].append(model.classifier(x).argmax(-1).cpu())
                x = x_adv
                seen["attacked"].append(x.cpu())
                seen["cls_adv"].append(model.classifier(x).argmax(-1).cpu())
            if classifier_only:
                p = torch.softmax(model.classifier(x).float(), dim=-1)
            else:
                z = None
                if model.samples > 0:
                    z = example_latents(
                        seed, range(start, start + len(batch)), model.samples, model.purifier.spec.fjoint
                    )
                    z = z.to(dev)
                logits = model.reconstruction_logits(x, z)  # (N, B, classes): model(x, z) before the aggregation
                p = probabilities(aggregate(logits, model.aggregation).float(), model.aggregation)
                if model.keep_reconstructions and model.last_reconstructions is not None:
                    if attack == "none":
                        seen["clean"].append(x.cpu())
                    seen["recons"].append(model.last_reconstructions.cpu())
                    seen["recon_cls"].append(logits.argmax(-1).cpu())
            probs.append(p.double().cpu())
    all_probs = torch.cat(probs)
    cls_clean = torch.cat(seen["cls_clean"]).tolist() if attack != "none" else []
    cls_adv = torch.cat(seen["cls_adv"]).tolist() if attack != "none" else []
    predictions = []
    for i, (img, p) in enumerate(zip(images, all_probs)):
        cls = int(p.argmax())
        t = truth[i]
        attacked = None
        if attack != "none":
            attacked = {
                "name": attack,
                "eps": a.eps,
                "target": "classifier",
                "classifier_clean": cls_clean[i],
                "classifier_attacked": cls_adv[i],
            }
        predictions.append(
            Prediction(
                str(img.path),
                cls,
                label(names, cls),
                p.tolist(),
                t,
                label(names, t) if t is not None else None,
                attacked,
            )
        )
    grid = None
    if save_reconstructions is not None:
        rows = reconstruction_rows(
            torch.cat(seen["clean"]),
            torch.cat(seen["recons"], dim=1),
            torch.cat(seen["recon_cls"], dim=1),
            all_probs.argmax(-1),
            names,
            truth,
            attacked=torch.cat(seen["attacked"]) if attack != "none" else None,
            classifier_clean=torch.tensor(cls_clean) if attack != "none" else None,
            classifier_attacked=torch.tensor(cls_adv) if attack != "none" else None,
            attack_title=f"PGD, ε = {_eps_text(a.eps)}",
        )
        grid = save_grid(save_reconstructions, rows, title=f"{model.run_dir.name}: {description}")
    return PredictResult(model.run_dir, predictions, description, names, grid.path if grid is not None else None, grid)


def _attack(
    classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, a: Any, seed: int, start: int
) -> torch.Tensor:
    """PGD on the classifier at the preset's ε (the purifier's training attack).

    Image i's random start depends on (seed, i) only, so ``--batch-size`` does not change the attack either.
    """
    from carso_cli.attacks import pgd

    noise = torch.stack(
        [
            torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
            for i in range(start, start + x.shape[0])
        ]
    ).to(x.device)
    return pgd(
        classifier, x, y, a.eps, a.pgd_steps, a.pgd_step_size, random_start=a.pgd_random_start, start_noise=noise
    )


def cli(
    images: Annotated[
        list[Path], typer.Argument(help="Image files (PNG, JPEG, …) and/or folders of them.", show_default=False)
    ],
    run_dir: RunOpt = None,
    samples: Annotated[
        int | None,
        typer.Option("--samples", min=0, help="Reconstructions per image (default: the run's; 0 = deterministic)."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes shown per image in the table.")] = 3,
    classifier_only: Annotated[
        bool, typer.Option("--classifier-only", help="The classifier's softmax alone, without the purifier.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON array to stdout (notices go to stderr).")
    ] = False,
    save_reconstructions: Annotated[
        Path | None,
        typer.Option(
            "--save-reconstructions",
            help=(
                "Write a captioned PNG grid: each input (≥ 128 px) beside its reconstructions, with the true class, "
                "CARSO's and each reconstruction's class."
            ),
        ),
    ] = None,
    aggregation: Annotated[
        Aggregation | None, typer.Option("--aggregation", help=AGGREGATION_HELP + " (default: the run's).")
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    data_root: DataRootOpt = Path("data"),
    label_: Annotated[
        str | None,
        typer.Option(
            "--label",
            help="Every image's true class (a name or a number); default: the image's "
            "folder name when it is a class name. Shown in the grid and the JSON.",
        ),
    ] = None,
    attack: Annotated[
        PredictAttack,
        typer.Option(
            "--attack",
            help="pgd: attack each image first (PGD on the classifier at the "
            "preset's ε) to see what purification does; needs the true class (--label or folder).",
        ),
    ] = PredictAttack.none,
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
        label_=label_,
        attack=attack.value,
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
            about = escape(pred.image)
            if pred.true_label is not None:
                about += f"\ntrue: {escape(pred.true_label)}"
            if pred.attack is not None:
                before, after = (
                    label(result.names, pred.attack[k]) for k in ("classifier_clean", "classifier_attacked")
                )
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
        console.print(table)
    if result.reconstructions is not None:
        err_console.print(f"[green]wrote[/] {escape(str(result.reconstructions))}", highlight=False)
