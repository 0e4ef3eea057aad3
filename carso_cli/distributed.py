"""Multi-process runs: detection of torchrun, re-launching through it, sharding and gathering.

As in nanoGPT, the same code runs with or without torchrun: inside torchrun the ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` variables are set and ``setup`` joins the process group (NCCL on CUDA,
gloo on CPU); outside it, a world of one. ``--gpus N`` outside torchrun re-runs the same command line
under ``python -m torch.distributed.run --nproc_per_node N`` (single node; for several nodes call
torchrun yourself: ``torchrun --nnodes … -m carso_cli train-purifier …``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> DistContext:
    """Join the process group when inside torchrun (one GPU per local rank), else a world of one."""
    if not in_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistContext(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def relaunch(nproc: int, argv: Sequence[str] | None = None) -> int:
    """Run ``carso ARGV`` under torchrun with ``nproc`` processes on this node; returns its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    # torchrun's argparse would read "--run" as an abbreviation of its own "--run-path": pass the
    # spelling every carso command also accepts.
    args = ["--run-dir" if a == "--run" else "--run-dir=" + a[6:] if a.startswith("--run=") else a for a in args]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "carso_cli", *args,
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def relaunch_argv(command: str, **opts: Any) -> list[str]:
    """``carso [--debug] COMMAND --opt value …`` rebuilt from parsed options, for ``relaunch``.

    Built from the options rather than ``sys.argv`` so that it is right however the app was invoked.
    ``None``/``False`` options are left out, ``True`` becomes a bare flag, lists repeat the flag, enums
    give their value.
    """
    from carso_cli.cli import debug_enabled

    argv = ["--debug"] if debug_enabled() else []
    argv.append(command)
    for name, value in opts.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(getattr(value, "value", value))]
    return argv


def check_gpus(gpus: int, device: str | None) -> None:
    """``--gpus N`` (N > 1) asks for N CUDA devices unless ``--device cpu`` says N CPU (gloo) processes.

    No CUDA visible is an error rather than a silent CPU job that would run for days (issue 7).
    """
    from carso_cli.errors import ConfigError

    if gpus <= 1 or (device is not None and not device.startswith("cuda")):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"--gpus {gpus}: no CUDA device visible; --device cpu runs {gpus} CPU processes")
    if gpus > torch.cuda.device_count():
        raise ConfigError(f"--gpus {gpus}: only {torch.cuda.device_count()} CUDA device(s) visible on this node")


def should_relaunch(gpus: int) -> bool:
    """True when ``--gpus N`` (N > 1) was asked for and this process is not already under torchrun."""
    return gpus > 1 and not in_torchrun()


def shard(n: int, rank: int, world_size: int) -> range:
    """Contiguous slice of ``range(n)`` for ``rank``: shards differ in size by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather_objects(obj: Any, ctx: DistContext) -> list[Any] | None:
    """All ranks' ``obj`` on rank 0 (in rank order), None elsewhere; [obj] without distribution."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] | None = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, its result on every rank; a ``CarsoError`` it raises is raised on every rank
    (so that the other ranks do not wait forever for a rank 0 that refused to start)."""
    from carso_cli.errors import CarsoError

    result: Any = None
    error: str | None = None
    if ctx.is_main:
        try:
            result = fn()
        except CarsoError as err:
            if ctx.distributed:
                broadcast_object((None, str(err)), ctx)
            raise
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise CarsoError(error)
    return result
