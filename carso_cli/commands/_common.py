"""Options and helpers shared by the subcommands (kept here so every command spells them alike)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

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


def option_overrides(sets: list[str] | None, **explicit: Any) -> dict[str, Any]:
    """``--set`` lines, then the options that stand for a preset key (``training.epochs=…``; None = not
    given), as one dict of overrides: what ``load_config`` applies and ``config.validate`` checks."""
    overrides = dict(parse_override(text) for text in sets or [])
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    return overrides


def load_preset(preset: str, sets: list[str] | None = None, **explicit: Any) -> Config:
    """The preset with ``--set`` overrides, then explicit options (``training.epochs=…``; None = keep)."""
    return load_config(preset, option_overrides(sets, **explicit))


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


def memory_overrides(
    attack_chunk: str | None, micro_batch: str | None, section: str = "training"
) -> dict[str, int | str]:
    """``--attack-chunk`` / ``--micro-batch``, parsed once, as overrides of ``section``: ``training`` for the
    purifier, ``classifier_training`` for ``train-classifier`` (0: the whole batch)."""
    from carso_cli.memory import parse_chunk

    given = {"attack_chunk": (attack_chunk, "--attack-chunk"), "micro_batch": (micro_batch, "--micro-batch")}
    return {
        f"{section}.{key}": parse_chunk(value, option) or 0
        for key, (value, option) in given.items()
        if value is not None
    }


def memory_sets(
    sets: list[str] | None, attack_chunk: str | None, micro_batch: str | None, section: str = "training"
) -> list[str] | None:
    """``memory_overrides`` as ``--set`` lines (for ``carso bench``, which passes them on as text)."""
    extra = [f"{key}={value}" for key, value in memory_overrides(attack_chunk, micro_batch, section).items()]
    return [*(sets or []), *extra] or None


def relaunch_training(
    ctx: typer.Context,
    gpus: int,
    device: str | None,
    *,
    target: Path | None,
    checkpoint_of: Callable[[Path], Path],
    started_out: Callable[[float], Path | None] | None = None,
    **overrides: Any,
) -> NoReturn:
    """Run a training command again under torchrun with ``gpus`` processes, from its parsed options.

    When a rank dies, one line says so and how to continue: the training's ``target`` (its --out, else the
    run the ranks started since, ``started_out``) and whether its checkpoint (``checkpoint_of``) is intact.
    """
    from carso_cli import checkpoint as ckpt
    from carso_cli import distributed
    from carso_cli.cli import debug_enabled

    distributed.check_gpus(gpus, device)
    argv = distributed.relaunch_argv(ctx, **overrides)  # every option as parsed, --no-x included
    started = time.time()
    try:
        raise typer.Exit(distributed.relaunch(gpus, argv, debug=debug_enabled()))
    except distributed.RankDied as died:
        found = target if target is not None else started_out(started) if started_out is not None else None
        if target is None and found is not None:
            argv += ["--out", str(found)]
        state = checkpoint_of(found) if found is not None else None
        kept = ckpt.intact_checkpoint(state) if state is not None else None
        raise died.resumable(kept and f"{kept} is intact ({state})", argv) from None


def training_config(
    preset: str | None, overrides: dict[str, Any], resumed: Callable[[], Config] | None, missing: str
) -> Config:
    """A training's config: the run's own when resuming (``resumed``), else the preset's with ``overrides``;
    with neither, ``missing`` is the error."""
    if resumed is not None:
        return resumed()
    if preset is None:
        raise CarsoError(missing)
    return load_config(preset, overrides)


def run_training(
    run: Callable[..., Any],
    *args: Any,
    preset: str | None,
    resume: bool,
    device: str | None,
    data_root: Path,
    seed: int,
    bf16: bool | None,
    report: Callable[[Any, Any], None],
) -> None:
    """A training's ``run(*args, …)`` with the options both trainings share; then rank 0 prints: the line
    that says the run had already finished, else ``report(result, console)``."""
    from carso_cli.cli import console

    result = run(
        *args,
        device=resolve_device(device),
        resume=resume,
        data_root=data_root,
        seed=seed,
        bf16=bf16,
        console=console,
        preset=preset if resume else None,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if result.complete is not None:
        console.print(result.complete, soft_wrap=True, highlight=False, markup=False)
    else:
        report(result, console)
