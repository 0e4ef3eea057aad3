"""Helpers the commands share: the device, preset overrides, and what both trainings do around their run
(relaunch under torchrun, config, the end-of-run line). Their shared option types are ``_options.py``."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import typer

from carso_cli.config import Config, load_config, parse_override
from carso_cli.errors import CarsoError


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


def preset_config(preset: str | None, overrides: dict[str, Any], missing: str) -> Config:
    """A new training's config: the preset's with ``overrides``; no preset is the error ``missing``."""
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
