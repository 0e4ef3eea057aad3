"""Multi-process runs: detection of torchrun, re-launching through it, sharding and gathering.

As in nanoGPT, the same code runs with or without torchrun: inside torchrun the ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK`` variables are set and ``setup`` joins the process group (NCCL on CUDA,
gloo on CPU); outside it, a world of one. ``--gpus N`` outside torchrun re-runs the same command under
torchrun's launcher with N processes (``relaunch``: what ``torchrun --standalone --nproc_per_node N``
does, run inside carso so that a failed job is one line; single node; for several nodes call torchrun
yourself: ``torchrun --nnodes … -m carso_cli train-purifier …``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from carso_cli.errors import CarsoError


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


# Set by ``relaunch`` for its workers: a folder where each rank leaves the one line it would have printed
# (``report_failure``), so that the launcher prints one line for the whole job instead of one per rank.
LAUNCHED_ENV = "CARSO_LAUNCHER_DIR"


class RankDied(CarsoError):
    """A worker died without an error of its own (killed by a signal, or an abrupt exit); the others
    were stopped. ``resumable`` adds what is left and the command that continues."""

    def resumable(self, kept: str | None, argv: Sequence[str]) -> CarsoError:
        """The one line: this, what is kept (None: nothing) and the command that continues (``argv``)."""
        if kept is None:
            again = [a for a in argv if a != "--resume"]
            return CarsoError(
                f"{self}; no checkpoint was written yet, so the training so far is lost; "
                f"start again with: {shlex.join(['carso', *again])}"
            )
        again = list(argv) if "--resume" in argv else [*argv, "--resume"]
        return CarsoError(f"{self}; {kept}; continue with: {shlex.join(['carso', *again])}")


def relaunch(nproc: int, argv: Sequence[str] | None = None, debug: bool = False) -> int:
    """Run ``carso ARGV`` under torchrun's launcher with ``nproc`` processes on this node; 0 once all succeed.

    The launcher (``torch.distributed.launcher.elastic_launch``, what ``torchrun --standalone`` runs)
    runs in this process, so that a failure comes back as data rather than torchrun's report: a rank
    that died without a word raises ``RankDied`` naming it and how it died; otherwise the first rank's
    own error line is raised as a ``CarsoError`` (printed once, not once per rank). Ctrl-C / SIGTERM
    reach the launcher, which passes them on to the workers (they checkpoint and stop). ``debug``
    (the CLI's ``--debug``) keeps the launcher's own warnings and failure report.
    """
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    args = list(sys.argv[1:] if argv is None else argv)
    # torchrun's argparse would read "--run" as an abbreviation of its own "--run-path": pass the
    # spelling every carso command also accepts.
    args = ["--run-dir" if a == "--run" else "--run-dir=" + a[6:] if a.startswith("--run=") else a for a in args]
    launch = parse_args([f"--nproc_per_node={nproc}", "-m", "carso_cli", *args])
    # As torchrun --standalone: a rendezvous on a free local port.
    launch.rdzv_backend, launch.rdzv_endpoint, launch.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", LAUNCHED_ENV)}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    with tempfile.TemporaryDirectory(prefix="carso-ranks-") as reports:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        os.environ[LAUNCHED_ENV] = reports  # the workers inherit the launcher's environment
        if not debug:
            logging.disable(logging.ERROR)  # the launcher's own warnings and its failure report
        try:
            config, cmd, cmd_args = config_from_args(launch)
            elastic_launch(config, cmd)(*cmd_args)
        except ChildFailedError as err:
            raise _launch_failure(err.failures, Path(reports)) from None
        except SignalException as err:  # Ctrl-C / SIGTERM: the workers had it too, and said why they stopped
            raise _launch_failure({}, Path(reports), stopped=err.sigval.name) from None
        finally:
            logging.disable(logging.NOTSET)
            for sig, handler in handlers.items():  # the launcher leaves its own installed
                if handler is not None:
                    signal.signal(sig, handler)
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return 0


def _launch_failure(failures: dict[int, Any], reports: Path, stopped: str | None = None) -> BaseException:
    """The one error for a failed job: a rank that died without a word, else the first rank's own line."""
    said = {}
    for path in reports.glob("rank-*.json"):
        try:
            said[int(path.stem[5:])] = json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a rank killed in its write is one that said nothing
    silent = sorted((f.timestamp, rank, f) for rank, f in failures.items() if rank not in said)
    if silent:
        _, rank, f = silent[0]
        how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"
        return RankDied(f"rank {rank} (pid {f.pid}) {how}, without an error of its own; the other ranks were stopped")
    if said:
        first = said[min(said)]
        return KeyboardInterrupt() if first.get("kind") == "interrupted" else CarsoError(first["text"])
    if stopped is not None:
        return CarsoError(
            f"stopped by {stopped} before the workers could say where they were; "
            "continue with --resume if a checkpoint was written"
        )
    return CarsoError(
        "the distributed job failed without an error message (run with --debug to see the launcher's report)"
    )


def report_failure(kind: str, text: str) -> bool:
    """In a worker started by ``relaunch``: leave the error line for the launcher and return True (the
    caller prints nothing); False elsewhere (one process, or a torchrun started by hand)."""
    folder = os.environ.get(LAUNCHED_ENV)
    if not folder or not in_torchrun() or not Path(folder).is_dir():
        return False
    from carso_cli.checkpoint import atomic_write_json

    atomic_write_json(Path(folder) / f"rank-{int(os.environ['RANK'])}.json", {"kind": kind, "text": text})
    return True


def relaunch_argv(ctx: Any, **overrides: Any) -> list[str]:
    """``carso [--debug] COMMAND --opt value …`` rebuilt from the running command's parsed parameters.

    Args:
        ctx: the command's click/Typer context (a ``ctx: typer.Context`` parameter of its ``cli``);
            its parents give the global options (``--debug``).
        overrides: values the command settled before relaunching (e.g. a default ``--out`` named
            once for every rank), by parameter name; None leaves the parameter out.
    Returns:
        The arguments after ``carso``, for ``relaunch``.

    Every parameter the user gave (on the command line or through the environment) is rebuilt from
    its own declaration: the longest ``--`` spelling, ``--x`` / ``--no-x`` from the value of a
    two-sided flag, one ``--opt value`` per item of a repeatable option, an enum's value. Parameters
    left at their default are left out, so the workers compute the same default and the command that
    a failure prints ("continue with: carso …") is the user's own; a one-sided flag such as
    ``--resume`` has no spelling for its default anyway. Being built from the declarations rather
    than a list of names, a new option (a new ``--x/--no-x`` included) reaches the workers untouched.
    """
    chain = []
    while ctx is not None:
        chain.insert(0, ctx)
        ctx = ctx.parent
    argv: list[str] = []
    for depth, level in enumerate(chain):
        if depth:  # the root's info_name is the program ("carso"), each level below it a command name
            argv.append(level.info_name)
        argv += _parameters_argv(level, overrides if depth == len(chain) - 1 else {})
    return argv


def _parameters_argv(ctx: Any, overrides: dict[str, Any]) -> list[str]:
    """One context's given parameters as command-line words (options first, then arguments)."""
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        name = param.name
        if name in overrides:
            value = overrides[name]
        elif not param.expose_value or _source(ctx, name) in ("DEFAULT", "DEFAULT_MAP"):
            continue
        else:
            value = ctx.params.get(name)
        if value is None:
            continue
        if param.param_type_name == "argument":
            arguments += [_word(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        else:
            options += _option_words(param, value)
    return options + (["--", *arguments] if any(a.startswith("-") for a in arguments) else arguments)


def _source(ctx: Any, name: str) -> str | None:
    source = ctx.get_parameter_source(name)
    return None if source is None else source.name


def _option_words(param: Any, value: Any) -> list[str]:
    """``--opt value`` words for one option's parsed value."""
    flag = max((o for o in param.opts if o.startswith("--")), key=len, default=param.opts[0])
    if param.is_flag and param.is_bool_flag:
        if value:
            return [flag]
        off = max(param.secondary_opts, key=len, default=None)
        return [] if off is None else [off]  # a one-sided flag at its "off" state: nothing to say
    if getattr(param, "count", False):
        return [flag] * int(value)
    words: list[str] = []
    for item in list(value) if param.multiple else [value]:
        parts = [_word(v) for v in item] if param.nargs > 1 else [_word(item)]
        # "--opt=-3": a value that starts with "-" is never read as an option of its own.
        words += [f"{flag}={parts[0]}"] if len(parts) == 1 and parts[0].startswith("-") else [flag, *parts]
    return words


def _word(value: Any) -> str:
    """An enum's value, a path or a number as the command line spells it (``repr``: an exact float)."""
    value = getattr(value, "value", value)
    return repr(value) if isinstance(value, float) else str(value)


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
