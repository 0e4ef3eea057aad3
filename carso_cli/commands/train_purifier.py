"""``carso train-purifier``: train the purifier against a frozen classifier (sections 4.4 and 5.1).

Each step: an adversarially-balanced batch (a preset fraction of it attacked by FGSM/PGD at ε/2 and ε
against the classifier), the classifier's representation of it, the purifier's VAE pass, and the loss —
summed BCE to the *clean* image plus β·KL — optimised by RAdam inside Lookahead with the per-epoch
LR schedule of Table 16. Runs in one process or under torchrun (DDP + SyncBatchNorm, the preset's batch
being the global one); every random draw depends on (seed, epoch, batch) only, so N processes
compute what one does and a resumed run ends where an uninterrupted one ends. The training itself is
``carso_cli.training.purifier`` (its run: ``training.session``); this module turns options into a config.

Several GPUs: ``--gpus N`` re-runs the command under torchrun. Several nodes: start torchrun yourself on
every node, e.g. ``torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500
-m carso_cli train-purifier --preset cifar10 --classifier W --out /shared/runs/cifar10`` (the run
directory must be on a shared file system; only global rank 0 writes to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from carso_cli import checkpoint as ckpt
from carso_cli import distributed
from carso_cli.commands._common import (
    memory_overrides,
    option_overrides,
    preset_config,
    relaunch_training,
    run_training,
)
from carso_cli.commands._options import (
    AttackChunkOpt,
    BatchSizeOpt,
    Bf16Opt,
    ClassifierOpt,
    ClassifierWeightsOpt,
    CompileOpt,
    DataRootOpt,
    DeviceOpt,
    GpusOpt,
    MicroBatchOpt,
    SeedOpt,
    SetOpt,
    TrainingPresetOpt,
)
from carso_cli.models import build_purifier, sources
from carso_cli.training import purifier
from carso_cli.training.purifier import CHECKPOINT, CURVES_FILE, PurifierResult, resume_config
from carso_cli.training.purifier_step import PurifierTrainStep

# What callers of the command module used before the training moved to carso_cli.training (tests, bench).
__all__ = ["CHECKPOINT", "CURVES_FILE", "PurifierResult", "PurifierTrainStep", "build_purifier", "resume_config", "run"]


run = purifier.run  # what callers of the command module (tests, bench, demo) call


def _started_since(since: float) -> Path | None:
    """The run under ./runs whose checkpoint was written since ``since`` (a relaunched job without --out)."""
    runs = [
        p for p in ckpt.RUNS_ROOT.glob("*") if (p / CHECKPOINT).is_file() and (p / CHECKPOINT).stat().st_mtime >= since
    ]
    return max(runs, key=lambda p: (p / CHECKPOINT).stat().st_mtime) if runs else None


OutOpt = Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<preset>-<timestamp>).")]
EpochsOpt = Annotated[
    int | None,
    typer.Option("--epochs", min=1, help="Epochs (overrides training.epochs; with --resume, extends the run)."),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out (default: the latest) from its last checkpoint.")
]


def cli(
    ctx: typer.Context,
    preset: TrainingPresetOpt = None,
    classifier: ClassifierOpt = None,
    classifier_weights: ClassifierWeightsOpt = None,
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
    attack_chunk: AttackChunkOpt = None,
    micro_batch: MicroBatchOpt = None,
    compile_: CompileOpt = None,
) -> None:
    """Train the purifier against a frozen classifier (adversarially-balanced batches, RAdam+Lookahead)."""
    from carso_cli import zoo

    set_, classifier = sources.option_sets(set_, classifier, classifier_weights)  # a source sets the architecture
    classifier = zoo.resolve_weights(classifier)  # a path, or a published model's name (carso pull --list)
    # Every option that stands for a preset key, parsed once into overrides (checked by config.validate).
    overrides = option_overrides(
        set_,
        **memory_overrides(attack_chunk, micro_batch),
        **{"training.compile": compile_, "training.epochs": epochs, "training.batch_size": batch_size},
    )
    if distributed.should_relaunch(gpus):
        relaunch_training(
            ctx, gpus, device, target=out, checkpoint_of=lambda run: run / CHECKPOINT, started_out=_started_since
        )
    # A resumed run keeps its config (its --batch-size is checked against the run's).
    missing = "--preset is required (or --resume to continue a run)"
    cfg = resume_config(out, overrides) if resume else preset_config(preset, overrides, missing)
    shared = {"preset": preset, "resume": resume, "device": device, "data_root": data_root, "seed": seed, "bf16": bf16}
    run_training(run, cfg, classifier, out, report=_report, **shared)


def _report(result: PurifierResult, console: Any) -> None:
    """What rank 0 prints at the end of the training: the bundle and the last epoch's losses, then the run
    directory."""
    last = result.records[-1] if result.records else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "bce", "kl") if k in last)
    console.print(
        f"purifier trained: {result.run / ckpt.PURIFIER_FILE}" + (f" (last epoch: {summary})" if summary else ""),
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    console.print(str(result.run), soft_wrap=True, highlight=False, markup=False)
