"""``carso train-classifier``: train the preset's classifier, clean or with PGD adversarial training.

For when no published robust classifier can be downloaded (the paper uses published weights, section
5.1), and for the paper's clean-vs-adversarial classifier ablation. PGD adversarial training follows
Madry et al. (2018). The training itself is ``carso_cli.training.classifier`` (the same session —
data, DDP, progress, checkpoint and resume — as ``train-purifier``'s, ``carso_cli.training.session``);
this module turns the options into a config and calls it.
Files, for ``--out DIR/NAME.safetensors``: the weights ``NAME.safetensors`` (which
``train-purifier --classifier`` accepts) and, beside them, ``NAME.state.safetensors`` (full training
state, for ``--resume``), ``NAME.config.toml``, ``NAME.metrics.jsonl`` and ``NAME.curves.png``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from carso_cli import distributed
from carso_cli.commands._common import (
    memory_overrides,
    option_overrides,
    preset_config,
    relaunch_training,
    run_training,
)
from carso_cli.commands._options import (
    BatchSizeOpt,
    Bf16Opt,
    ClassifierAttackChunkOpt,
    ClassifierMicroBatchOpt,
    DataRootOpt,
    DeviceOpt,
    GpusOpt,
    SeedOpt,
    SetOpt,
    TrainingPresetOpt,
)
from carso_cli.config import load_config
from carso_cli.errors import CarsoError
from carso_cli.training import classifier
from carso_cli.training.classifier import ClassifierResult, companion, default_out, recalibrate_bn, resume_config

# What callers of the command module used before the training moved to carso_cli.training (tests, demo).
__all__ = ["ClassifierResult", "companion", "default_out", "recalibrate_bn", "resume_config", "run"]


class Adversarial(str, Enum):
    pgd = "pgd"
    none = "none"


run = classifier.run  # what callers of the command module (tests, bench, demo) call


AdversarialOpt = Annotated[
    Adversarial | None, typer.Option("--adversarial", help="pgd (Madry et al.) or none (default: the preset's).")
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Weights file (default runs/classifiers/<preset>-<kind>-<timestamp>.safetensors)."),
]
EpochsOpt = Annotated[
    int | None, typer.Option("--epochs", min=1, help="Epochs (overrides classifier_training.epochs).")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the training of --out from its last checkpoint.")]


def cli(
    ctx: typer.Context,
    preset: TrainingPresetOpt = None,
    adversarial: AdversarialOpt = None,
    out: OutOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    gpus: GpusOpt = 1,
    device: DeviceOpt = None,
    resume: ResumeOpt = False,
    data_root: DataRootOpt = Path("data"),
    seed: SeedOpt = 0,
    bf16: Bf16Opt = None,
    set_: SetOpt = None,
    attack_chunk: ClassifierAttackChunkOpt = None,
    micro_batch: ClassifierMicroBatchOpt = None,
) -> None:
    """Train the preset's classifier (PGD adversarial or standard); prints the weights' path."""
    # Every option that stands for a preset key, parsed once into overrides (checked by config.validate);
    # a resumed training keeps its mode (--adversarial is not applied to it).
    resumed = option_overrides(
        set_,
        **memory_overrides(attack_chunk, micro_batch, section="classifier_training"),
        **{"classifier_training.epochs": epochs, "classifier_training.batch_size": batch_size},
    )
    mode = option_overrides(None, **{"classifier_training.adversarial": adversarial and adversarial.value})
    overrides = {**resumed, **mode}  # --adversarial over a --set of the same key
    if distributed.should_relaunch(gpus):
        if out is None and not resume and preset is not None:  # named here, for the line that says how to resume
            out = default_out(load_config(preset, overrides))
        relaunch_training(ctx, gpus, device, target=out, checkpoint_of=_state_file, out=out)
    if resume and out is None:
        raise CarsoError("--resume needs --out FILE.safetensors (the weights file of the run to continue)")
    # A resumed run keeps its config (its --batch-size is checked against the run's).
    missing = "--preset is required (or --resume with --out)"
    cfg = resume_config(out, resumed) if resume else preset_config(preset, overrides, missing)
    shared = {"preset": preset, "resume": resume, "device": device, "data_root": data_root, "seed": seed, "bf16": bf16}
    run_training(run, cfg, out, report=_report, **shared)


def _state_file(weights: Path) -> Path:
    """The training checkpoint beside a classifier's weights (what ``--resume`` continues from)."""
    return companion(weights, "state.safetensors")


def _report(result: ClassifierResult, console: Any) -> None:
    """What rank 0 prints at the end of the training: the clean test accuracy (if measured), then the
    weights' path."""
    if result.clean_accuracy == result.clean_accuracy:  # not NaN
        console.print(f"clean test accuracy: {100 * result.clean_accuracy:.2f}%")
    console.print(str(result.weights), soft_wrap=True, highlight=False, markup=False)
