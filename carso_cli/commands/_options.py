"""The options several commands take (one declaration each, so every command spells them alike); eval's
and sanity's own are in ``_eval_options.py`` and ``_sanity_options.py``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from carso_cli.aggregation import AGGREGATIONS

PresetOpt = Annotated[
    str, typer.Option("--preset", "-p", help="Preset name (cifar10, cifar100, tinyimagenet, smoke) or path to a .toml.")
]

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override any preset value: section.key=value (repeatable), e.g. training.epochs=3."),
]

RunOpt = Annotated[
    # "--run-dir" is an alias because torchrun's own parser takes "--run" for an abbreviation of its
    # "--run-path" when a command is re-launched under it (distributed.relaunch rewrites it).
    Path | None, typer.Option("--run", "--run-dir", help="Run directory (default: the most recent under ./runs).")
]

DeviceOpt = Annotated[str | None, typer.Option("--device", help="cuda, cuda:N or cpu (default: cuda when available).")]

SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]

DataRootOpt = Annotated[Path, typer.Option("--data-root", help="Where datasets live / are downloaded.")]

TrainingPresetOpt = Annotated[
    str | None, typer.Option("--preset", "-p", help="Preset name or .toml (not needed with --resume).")
]

BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", min=1, help="Global batch size (split across processes).")
]

Bf16Opt = Annotated[
    bool | None,
    typer.Option("--bf16/--no-bf16", help="bfloat16 autocast on CUDA (default: the preset's training.bf16)."),
]

GpusOpt = Annotated[
    int, typer.Option("--gpus", min=1, help="Processes to run (torchrun); with --device cpu, gloo on CPU.")
]

ClassifierOpt = Annotated[
    Path | None,
    typer.Option(
        "--classifier",
        help=(
            "Classifier weights (.safetensors, .pt, .pth), a published model's name (carso pull --list), or a "
            "source: robustbench:NAME, torchvision:NAME, timm:NAME, python:package.module:factory (imports and "
            "runs that module of yours, found in the current directory or on PYTHONPATH)."
        ),
    ),
]

ClassifierWeightsOpt = Annotated[
    Path | None,
    typer.Option(
        "--classifier-weights",
        help="Weights for a torchvision:/timm:/python: --classifier (safetensors, or .pt read with weights_only=True).",
    ),
]

# The aggregation choices of every command, from the one list in carso_cli.aggregation.
Aggregation = Enum("Aggregation", {name.replace("-", "_"): name for name in AGGREGATIONS}, type=str)  # type: ignore[misc]

AGGREGATION_HELP = (
    "dexp (paper, section 4.5, in float64), dexp-authors (the authors' float32 lexsemble: ±inf and NaN "
    "gradients on confident examples), dexp-logsum (the same prediction, attacked through log Σ exp l: no "
    "saturated gradients), logit, prob or vote (ablation, appendix B.2)"
)

AggregationOpt = Annotated[
    Aggregation | None, typer.Option("--aggregation", help=AGGREGATION_HELP + " (default: the preset's).")
]

AttackChunkOpt = Annotated[
    str | None,
    typer.Option(
        "--attack-chunk",
        help="Attack at most N examples at once (or 'auto': from free GPU memory); bounds memory, "
        "same adversarial examples. Default: the preset's training.attack_chunk (0 = all).",
    ),
]

CompileOpt = Annotated[
    str | None,
    typer.Option(
        "--compile",
        metavar="BACKEND",
        help="torch.compile the attacked classifier and the purifier's training pass with "
        "this backend ('inductor'; 'off', the default, runs eager). Rounds differently from eager; if compiling fails, "
        "the run says so and continues eager. Recorded as training.compile.",
    ),
]

ClassifierAttackChunkOpt = Annotated[
    str | None,
    typer.Option(
        "--attack-chunk",
        help="PGD on at most N examples at once (or 'auto': from free GPU memory). The model is "
        "attacked in train mode, so each chunk has its own BatchNorm statistics ('ghost' batch "
        "norm): bounds memory, slightly different examples. Default: "
        "classifier_training.attack_chunk (0 = all).",
    ),
]

ClassifierMicroBatchOpt = Annotated[
    str | None,
    typer.Option(
        "--micro-batch",
        help="Forward/backward over micro-batches of M examples, gradients accumulated (or 'auto'). "
        "BatchNorm then normalises per micro-batch ('ghost' batch norm); recorded in the config.",
    ),
]

MicroBatchOpt = Annotated[
    str | None,
    typer.Option(
        "--micro-batch",
        help="Purifier forward/backward over micro-batches of M examples, gradients accumulated (or "
        "'auto'). BatchNorm then normalises per micro-batch ('ghost' batch norm), not over the "
        "global batch as in the paper; recorded in the run's config.",
    ),
]
