"""Training state on disk: the checkpoint a run resumes from (safetensors, written atomically)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli.distributed import DistContext
from carso_cli.errors import CheckpointError, ConfigError
from carso_cli.training.lookahead import Lookahead
from carso_cli.training.randomness import restore_rng

STATE_FORMAT = "carso-training-state"
STATE_FORMAT_VERSION = 1


def _flatten_optimizer(sd: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser state dict as (tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any], prefix: str) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            pid, key = name[len(head) :].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in info.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


@dataclass
class Position:
    """Where training stands: the next batch to run is ``batch`` of epoch ``epoch`` (both from 0)."""

    epoch: int = 0
    batch: int = 0


@dataclass
class TrainingState:
    """A training checkpoint as read back from disk."""

    kind: str
    position: Position
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]]  # rank → (tensors, extra)
    config_toml: str
    epoch_sums: list[float] | None
    extra: dict[str, Any] = field(default_factory=dict)


def save_training_state(
    path: str | Path,
    *,
    kind: str,
    position: Position,
    model: nn.Module,
    optimizer: Lookahead | torch.optim.Optimizer,
    config_toml: str,
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    epoch_sums: list[float] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the full training state atomically (one safetensors file).

    ``rng``: one ``capture_rng()`` per rank (rank order). ``epoch_sums``: the running metric sums of a
    partly done epoch (mid-epoch checkpoints).
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {}
    if isinstance(optimizer, Lookahead):
        sd = optimizer.state_dict()
        t, info = _flatten_optimizer(sd["optimizer"], "optim")
        tensors.update(t)
        flat_slow = [s for slows in sd["slow"] for s in slows]
        tensors.update({f"lookahead.slow.{i}": s for i, s in enumerate(flat_slow)})
        meta["lookahead"] = {"counter": sd["counter"], "k": sd["k"], "alpha": sd["alpha"]}
    else:
        t, info = _flatten_optimizer(optimizer.state_dict(), "optim")
        tensors.update(t)
    meta["optimizer"] = info
    rng_extra = {}
    for rank, (rt, rx) in enumerate(rng):
        tensors.update({f"rng.{rank}.{k}": v for k, v in rt.items()})
        rng_extra[str(rank)] = rx
    header = {
        "format": STATE_FORMAT,
        "format_version": str(STATE_FORMAT_VERSION),
        "kind": kind,
        "epoch": str(position.epoch),
        "batch": str(position.batch),
        "config": config_toml,
        "state": json.dumps({**meta, "rng": rng_extra, "epoch_sums": epoch_sums, "extra": extra or {}}),
    }
    ckpt.save_tensors(path, tensors, header)


def load_training_state(path: str | Path, kind: str) -> TrainingState:
    """Read a training checkpoint written by ``save_training_state`` (clear errors otherwise)."""
    tensors, meta = ckpt.load_tensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a carso training checkpoint")
    version = int(meta.get("format_version", "0"))
    if version > STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has training-state format {version}; this carso reads up to {STATE_FORMAT_VERSION}"
        )
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is a {meta.get('kind')} training checkpoint, not a {kind} one")
    info = json.loads(meta["state"])
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    inner = _unflatten_optimizer(tensors, info["optimizer"], "optim")
    if "lookahead" in info:
        slow = [
            tensors[f"lookahead.slow.{i}"] for i in range(sum(1 for k in tensors if k.startswith("lookahead.slow.")))
        ]
        optimizer: dict[str, Any] = {"optimizer": inner, "slow_flat": slow, **info["lookahead"]}
    else:
        optimizer = inner
    rng: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
    for name, value in tensors.items():
        if name.startswith("rng."):
            _, rank, key = name.split(".", 2)
            rng.setdefault(int(rank), ({}, info["rng"].get(rank, {})))[0][key] = value
    return TrainingState(
        kind=kind,
        position=Position(int(meta["epoch"]), int(meta["batch"])),
        model=model,
        optimizer=optimizer,
        rng=rng,
        config_toml=meta["config"],
        epoch_sums=info.get("epoch_sums"),
        extra=info.get("extra", {}),
    )


def check_resume(state: TrainingState, global_batch: int, preset: str | None, name: str) -> None:
    """Options a resumed run cannot change: the global batch (the batch composition and the position
    within an epoch depend on it) and the preset (``--preset``, if given again, must name the run's)."""
    if preset is not None:
        from carso_cli.config import load_config

        if load_config(preset).name != name:
            raise ConfigError(f"--preset {preset} is not the preset of the run being resumed ('{name}')")
    trained = state.extra.get("global_batch")
    if trained is not None and int(trained) != global_batch:
        raise ConfigError(f"the run was trained with a global batch of {trained}; it cannot change on resume")


def finished_run(checkpoint: Path, final: Path, epochs: int, where: Path) -> str | None:
    """With ``--resume``: the line that says a training is complete, or None when there is work left.

    Complete: the checkpoint is at the end of the last of ``epochs`` and the final file (the purifier
    bundle, the classifier weights) was written after it. A scheduler that requeues a job which had in
    fact finished reruns its script, ``--resume`` included: that rerun must succeed and change nothing.
    A checkpoint at the last epoch without a final file (say the disk filled up in that write) is not
    complete: the resumed command trains no more epochs and writes the final file.
    """
    meta = ckpt.read_metadata(checkpoint)
    trained, batch = int(meta.get("epoch", 0)), int(meta.get("batch", 0))
    if trained > epochs or (trained == epochs and batch > 0):
        raise ConfigError(
            f"{where} already trained {trained} epochs, more than the {epochs} asked for; "
            f"pass --epochs N (N > {trained}) to extend it"
        )
    if trained < epochs or not final.is_file() or final.stat().st_mtime_ns < checkpoint.stat().st_mtime_ns:
        return None
    return (
        f"{where} is complete: {epochs} of {epochs} epochs trained, {final.name} written; nothing to do "
        f"(--resume --epochs N with N > {epochs} extends it)"
    )


def load_optimizer_state(optimizer: Lookahead | torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore an optimiser (Lookahead included) from ``TrainingState.optimizer``."""
    if isinstance(optimizer, Lookahead):
        if "slow_flat" not in state:
            raise CheckpointError("the checkpoint has no Lookahead state")
        slow, flat, i = [], state["slow_flat"], 0
        for slows in optimizer.slow:
            slow.append(flat[i : i + len(slows)])
            i += len(slows)
        if i != len(flat):
            raise CheckpointError("the checkpoint's Lookahead slow weights do not match the model")
        optimizer.load_state_dict({"optimizer": state["optimizer"], "slow": slow, "counter": state["counter"]})
    else:
        optimizer.load_state_dict(state)


def restore_rank_rng(state: TrainingState, ctx: DistContext) -> None:
    """Restore this rank's RNG states (if the checkpoint has them for this rank)."""
    if ctx.rank in state.rng:
        restore_rng(*state.rng[ctx.rank])
