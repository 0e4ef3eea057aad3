"""Options and helpers shared by the subcommands (kept here so every command spells them alike)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from carso_cli.aggregation import AGGREGATIONS
from carso_cli.config import Config, load_config, parse_override
from carso_cli.errors import CarsoError

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
GpusOpt = Annotated[
    int, typer.Option("--gpus", min=1, help="Processes to run (torchrun); with --device cpu, gloo on CPU.")
]


# The aggregation choices of every command, from the one list in carso_cli.aggregation.
Aggregation = Enum("Aggregation", {name.replace("-", "_"): name for name in AGGREGATIONS}, type=str)  # type: ignore[misc]
AGGREGATION_HELP = (
    "dexp (paper, section 4.5, in float64), dexp-authors (the authors' float32 lexsemble: ±inf and NaN "
    "gradients on confident examples), dexp-logsum (the same prediction, attacked through log Σ exp l: no "
    "saturated gradients), logit, prob or vote (ablation, appendix B.2)"
)


def resolve_device(name: str | None) -> torch.device:
    """``None`` → cuda if available else cpu; a cuda device that is absent is a clear error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CarsoError(f"unknown device '{name}' (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CarsoError("--device cuda was asked for, but CUDA is not available on this machine")
    return device


def load_preset(preset: str, sets: list[str] | None = None, **explicit: Any) -> Config:
    """The preset with ``--set`` overrides, then explicit options (``training.epochs=…``; None = keep)."""
    overrides: dict[str, Any] = {}
    for text in sets or []:
        key, value = parse_override(text)
        overrides[key] = value
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    return load_config(preset, overrides)


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


def memory_sets(
    sets: list[str] | None, attack_chunk: str | None, micro_batch: str | None, section: str = "training"
) -> list[str] | None:
    """``--attack-chunk`` / ``--micro-batch`` as ``--set`` overrides of ``section`` (so relaunch and resume
    carry them): ``training`` for the purifier, ``classifier_training`` for ``train-classifier``."""
    from carso_cli.memory import parse_chunk

    extra = []
    for key, value, option in (
        ("attack_chunk", attack_chunk, "--attack-chunk"),
        ("micro_batch", micro_batch, "--micro-batch"),
    ):
        if value is not None:
            parsed = parse_chunk(value, option)
            extra.append(f"{section}.{key}={parsed if parsed is not None else 0}")
    return [*(sets or []), *extra] or None
