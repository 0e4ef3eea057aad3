"""Classifying image files with a trained CARSO model (or its classifier alone): what ``carso predict`` runs.

Each image is read and brought to the model's input (see ``carso_cli.images``), then classified by
the run's CARSO model: N reconstructions from the purifier's decoder, the classifier on each, and the
robust aggregation (section 4.5). The latent samples of image i depend only on (seed, i), not on the
batch it lands in, so the batch size never changes an answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from carso_cli import api
from carso_cli.aggregation import aggregate, probabilities
from carso_cli.api import example_latents
from carso_cli.classnames import label, run_class_names, true_classes
from carso_cli.display import format_eps
from carso_cli.errors import CarsoError
from carso_cli.images import Grid, InputImage, collect_images, load_image, reconstruction_rows, save_grid, to_float


class PredictAttack(str, Enum):
    """What is done to each image before it is classified (``carso predict --attack``)."""

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


@dataclass
class _Seen:
    """What the batches leave for the grid and the attack report, concatenated over batches."""

    probs: list[torch.Tensor] = field(default_factory=list)  # (B, classes) each
    clean: list[torch.Tensor] = field(default_factory=list)  # (B, C, H, W)
    attacked: list[torch.Tensor] = field(default_factory=list)  # (B, C, H, W)
    recons: list[torch.Tensor] = field(default_factory=list)  # (N, B, C, H, W)
    recon_cls: list[torch.Tensor] = field(default_factory=list)  # (N, B)
    cls_clean: list[torch.Tensor] = field(default_factory=list)  # (B,)
    cls_adv: list[torch.Tensor] = field(default_factory=list)  # (B,)


def _check(samples: int | None, batch_size: int, attack: str, classifier_only: bool, grid: Path | None) -> None:
    if classifier_only and grid is not None:
        raise CarsoError("--save-reconstructions needs the purifier: drop --classifier-only")
    if samples is not None and samples < 0:
        raise CarsoError(f"--samples must be ≥ 0 (got {samples})")
    if batch_size < 1:
        raise CarsoError(f"--batch-size must be ≥ 1 (got {batch_size})")
    if attack not in ("none", "pgd"):
        raise CarsoError(f"unknown attack '{attack}' (none or pgd)")


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
    _check(samples, batch_size, attack, classifier_only, save_reconstructions)
    paths = collect_images(inputs)
    model = api.load(run_dir, samples=samples, aggregation=aggregation, device=device)
    cfg = model.config
    images, names, truth = _read_inputs(paths, model, data_root, label_, attack, notify)
    model.keep_reconstructions = save_reconstructions is not None
    description = _description(model, classifier_only, seed, attack)
    seen = _Seen()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            _classify_batch(model, batch, truth, start, seed, attack, classifier_only, torch.device(device), seen)
    all_probs = torch.cat(seen.probs)
    predictions = _predictions(images, all_probs, truth, names, attack, cfg.attacks.eps, seen)
    grid = None
    if save_reconstructions is not None:
        grid = _save_grid(
            save_reconstructions, seen, all_probs, names, truth, attack, cfg.attacks.eps, model, description
        )
    return PredictResult(model.run_dir, predictions, description, names, grid.path if grid is not None else None, grid)


def _read_inputs(
    paths: list[Path],
    model: Any,
    data_root: Path | None,
    given: str | None,
    attack: str,
    notify: Callable[[str], None],
) -> tuple[list[InputImage], list[str] | None, list[int | None]]:
    """(the decoded images, the run's class names, each image's true class or None)."""
    cfg = model.config
    # Decode everything first: an unreadable file stops the command before any compute.
    images: list[InputImage] = [load_image(p, cfg.data.image_size, cfg.data.channels) for p in paths]
    for img in images:
        for note in img.notes:
            notify(f"{img.path}: {note}")
    names = run_class_names(model.run_dir, cfg, data_root, notify)  # stored in the run, else the dataset's
    truth = true_classes(paths, names, given, cfg.data.num_classes)
    if attack != "none" and any(t is None for t in truth):
        missing = next(p for p, t in zip(paths, truth) if t is None)
        raise CarsoError(
            f"--attack {attack} needs each image's true class, and {missing} has none: give --label "
            "CLASS, or keep the images in folders named after their classes (e.g. cat/1.png)"
        )
    return images, names, truth


def _description(model: Any, classifier_only: bool, seed: int, attack: str) -> str:
    """What produced the probabilities, in words (the table's caption and the grid's title)."""
    if classifier_only:
        description = "classifier only (no purifier)"
    else:
        n = model.samples
        description = (f"CARSO, {n} reconstructions" if n else "CARSO, 1 deterministic reconstruction (z = 0)") + (
            f", {model.aggregation} aggregation, seed {seed}"
        )
    a = model.config.attacks
    if attack != "none":
        description += f"; inputs attacked by PGD on the classifier (ε = {format_eps(a.eps)}, {a.pgd_steps} steps)"
    return description


def _classify_batch(
    model: Any,
    batch: list[InputImage],
    truth: list[int | None],
    start: int,
    seed: int,
    attack: str,
    classifier_only: bool,
    dev: torch.device,
    seen: _Seen,
) -> None:
    """Probabilities of one batch (images ``start`` … ``start + len(batch) - 1``) into ``seen``."""
    x = to_float(torch.stack([img.pixels for img in batch])).to(dev)
    if attack != "none":
        y = torch.tensor(truth[start : start + len(batch)], device=dev)
        x_adv = _attack(model.classifier, x, y, model.config.attacks, seed, start)
        seen.clean.append(x.cpu())
        seen.cls_clean.append(model.classifier(x).argmax(-1).cpu())
        x = x_adv
        seen.attacked.append(x.cpu())
        seen.cls_adv.append(model.classifier(x).argmax(-1).cpu())
    if classifier_only:
        p = torch.softmax(model.classifier(x).float(), dim=-1)
    else:
        z = None
        if model.samples > 0:
            z = example_latents(seed, range(start, start + len(batch)), model.samples, model.purifier.spec.fjoint)
            z = z.to(dev)
        logits = model.reconstruction_logits(x, z)  # (N, B, classes): model(x, z) before the aggregation
        p = probabilities(aggregate(logits, model.aggregation).float(), model.aggregation)
        if model.keep_reconstructions and model.last_reconstructions is not None:
            if attack == "none":
                seen.clean.append(x.cpu())
            seen.recons.append(model.last_reconstructions.cpu())
            seen.recon_cls.append(logits.argmax(-1).cpu())
    seen.probs.append(p.double().cpu())


def _predictions(
    images: list[InputImage],
    all_probs: torch.Tensor,
    truth: list[int | None],
    names: list[str] | None,
    attack: str,
    eps: float,
    seen: _Seen,
) -> list[Prediction]:
    cls_clean = torch.cat(seen.cls_clean).tolist() if attack != "none" else []
    cls_adv = torch.cat(seen.cls_adv).tolist() if attack != "none" else []
    predictions = []
    for i, (img, p) in enumerate(zip(images, all_probs)):
        cls = int(p.argmax())
        t = truth[i]
        attacked = None
        if attack != "none":
            attacked = {
                "name": attack,
                "eps": eps,
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
    return predictions


def _save_grid(
    out: Path,
    seen: _Seen,
    all_probs: torch.Tensor,
    names: list[str] | None,
    truth: list[int | None],
    attack: str,
    eps: float,
    model: Any,
    description: str,
) -> Grid:
    attacked = attack != "none"
    rows = reconstruction_rows(
        torch.cat(seen.clean),
        torch.cat(seen.recons, dim=1),
        torch.cat(seen.recon_cls, dim=1),
        all_probs.argmax(-1),
        names,
        truth,
        attacked=torch.cat(seen.attacked) if attacked else None,
        classifier_clean=torch.cat(seen.cls_clean) if attacked else None,
        classifier_attacked=torch.cat(seen.cls_adv) if attacked else None,
        attack_title=f"PGD, ε = {format_eps(eps)}",
    )
    return save_grid(out, rows, title=f"{model.run_dir.name}: {description}")


def _attack(
    classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, a: Any, seed: int, start: int
) -> torch.Tensor:
    """PGD on the classifier at the preset's ε (the purifier's training attack).

    Image i's random start depends on (seed, i) only, so the batch size does not change the attack either.
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
