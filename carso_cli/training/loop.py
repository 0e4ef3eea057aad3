"""The epoch loop both ``train-purifier`` and ``train-classifier`` use."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.markup import escape

from carso_cli.distributed import DistContext, shard
from carso_cli.errors import TrainingError
from carso_cli.training.metrics import append_metrics
from carso_cli.training.randomness import derived_seed, epoch_batches
from carso_cli.training.signals import StopSignal
from carso_cli.training.state import Position

# Third key of the epoch-level random streams: -1 the data order (``epoch_batches``), -2 the loader's
# worker seeds, -3 the augmentation of each example (keyed further by its dataset index). Step-level
# streams use a batch index (>= 0) there instead.
AUGMENTATION_STREAM = -3


class TrainingInterrupted(TrainingError):
    """Ctrl-C / SIGTERM: training stopped after a consistent checkpoint."""


class _ListSampler(torch.utils.data.Sampler[int]):
    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Batch:
    """One step's data: this rank's rows ``lo:hi`` of global batch ``index`` (size ``global_size``)."""

    epoch: int
    index: int
    x: torch.Tensor
    y: torch.Tensor
    lo: int
    hi: int
    global_size: int


@dataclass
class LoopSpec:
    """What the shared loop needs to know (both training commands fill one in)."""

    ctx: DistContext
    dataset: torch.utils.data.Dataset
    global_batch: int
    epochs: int
    seed: int
    sums: list[str]  # names of the per-batch sums ``compute`` returns; the last one is the example count
    title: str = "training"
    num_workers: int = 0
    checkpoint_every: int = 1
    drop_last: bool = True  # False: the epoch's last partial global batch is trained on too
    metrics_path: Path | None = None  # written by rank 0 only


@dataclass
class LoopHooks:
    """The command-specific parts of a training step.

    - ``start_epoch(epoch) → dict``: set LR/β for the epoch; returns the values to log (e.g. lr, beta).
    - ``compute(batch) → Tensor``: forward and backward; returns the local sums (float64, ``len(sums)``).
    - ``update()``: the optimiser step (called only once the loss is known to be finite on all ranks).
    - ``display(sums) → dict``: per-example metrics from the summed values (progress and metrics.jsonl).
    - ``save(position, epoch_sums)``: write a consistent checkpoint (called on every rank: it gathers).
    """

    start_epoch: Callable[[int], dict[str, float]]
    compute: Callable[[Batch], torch.Tensor]
    update: Callable[[], None]
    display: Callable[[list[float]], dict[str, float]]
    save: Callable[[Position, list[float] | None], None]


def _all_reduce(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        # gloo and NCCL both reduce float64 on their device; NCCL needs the tensor on the GPU.
        values = values.to(ctx.device)
        dist.all_reduce(values)
    return values.cpu()


def _loader(spec: LoopSpec, batches: list[torch.Tensor], start: int, lo: int, hi: int, epoch: int):
    """A loader over this rank's rows of ``batches[start:]`` (exactly one local batch per step).

    Example *i*'s augmentation is seeded by (seed, epoch, i) (``SeededExamples``) and the loader's own
    generator (worker seeds) by (seed, epoch): nothing is drawn from the process's global RNG, so the
    batches depend neither on the number of processes or workers nor on where a resumed epoch starts.
    """
    from carso_cli.data import SeededExamples, make_loader

    indices = [int(i) for b in batches[start:] for i in b[lo:hi]]
    examples = SeededExamples(spec.dataset, functools.partial(derived_seed, spec.seed, epoch, AUGMENTATION_STREAM))
    return make_loader(
        examples,
        hi - lo,
        shuffle=False,
        device=spec.ctx.device,
        num_workers=spec.num_workers,
        seed=derived_seed(spec.seed, epoch, -2),
        drop_last=False,
        sampler=_ListSampler(indices),
    )


def _epoch_batches(spec: LoopSpec, epoch: int) -> list[torch.Tensor]:
    n = len(spec.dataset)  # type: ignore[arg-type]
    return epoch_batches(n, spec.global_batch, spec.seed, epoch, spec.drop_last, min_last=spec.ctx.world_size)


def local_batches(spec: LoopSpec, epoch: int, start: int = 0) -> Iterator[Batch]:
    """This rank's batches of epoch ``epoch`` from batch ``start`` on (the data order of ``run_loop``)."""
    batches = _epoch_batches(spec, epoch)
    full = [b for b in batches if len(b) == spec.global_batch]
    part = shard(spec.global_batch, spec.ctx.rank, spec.ctx.world_size)
    if start < len(full):
        for index, (x, y) in enumerate(_loader(spec, full, start, part.start, part.stop, epoch), start=start):
            yield Batch(epoch, index, x, y, part.start, part.stop, spec.global_batch)
    if len(batches) > len(full) and start <= len(full):  # the kept last partial batch (drop_last = false)
        last = batches[-1]
        part = shard(len(last), spec.ctx.rank, spec.ctx.world_size)
        for x, y in _loader(spec, [last], 0, part.start, part.stop, epoch):
            yield Batch(epoch, len(full), x, y, part.start, part.stop, len(last))


def run_loop(
    spec: LoopSpec, hooks: LoopHooks, start: Position, carried_sums: list[float] | None = None, console: Any = None
) -> list[dict[str, Any]]:
    """Run epochs ``start.epoch … spec.epochs-1`` (from batch ``start.batch`` in the first one).

    Per batch: ``compute`` (forward, backward), one all-reduce of [sums…, stop flag], a finiteness check
    naming epoch and batch (before the optimiser step, so the last checkpoint stays good), ``update``.
    Per epoch: one line in ``metrics.jsonl`` and, every ``checkpoint_every`` epochs and at the end, a
    checkpoint. Ctrl-C / SIGTERM: the current batch finishes, a mid-epoch checkpoint is written, and
    ``TrainingInterrupted`` is raised. Returns the epoch records written.
    """
    _check_sizes(spec)
    records: list[dict[str, Any]] = []
    progress = _progress(spec.ctx, console)
    batches_per_epoch = len(_epoch_batches(spec, 0))  # the same number every epoch
    with StopSignal() as stop, progress:
        epochs_task = progress.add_task(
            escape(f"{spec.title}: epochs"), total=spec.epochs, completed=start.epoch, info=""
        )
        for epoch in range(start.epoch, spec.epochs):
            first = start.batch if epoch == start.epoch else 0
            schedule = hooks.start_epoch(epoch)
            carried = carried_sums if (carried_sums and epoch == start.epoch and first > 0) else None
            sums = torch.tensor(carried or [0.0] * len(spec.sums), dtype=torch.float64)
            batch_task = progress.add_task(f"epoch {epoch}", total=batches_per_epoch, completed=first, info="")
            t0, images, index = time.perf_counter(), 0, first - 1
            for batch in local_batches(spec, epoch, first):
                index = batch.index
                step_sums, stop_now = _step(spec, hooks, batch, stop.requested is not None)
                sums += step_sums
                images += batch.global_size
                rate = images / max(time.perf_counter() - t0, 1e-9)
                shown = {**hooks.display(step_sums.tolist()), **schedule}
                info = "  ".join([f"{rate:,.0f} img/s"] + [f"{k} {v:.4g}" for k, v in shown.items()])
                progress.update(batch_task, completed=index + 1, info=info)
                if stop_now and not (epoch == spec.epochs - 1 and index + 1 == batches_per_epoch):
                    if index + 1 == batches_per_epoch:  # the epoch is complete: record it, save its end
                        _finish_epoch(spec, hooks, epoch, sums, schedule, t0, images, index + 1, records)
                    _save_and_stop(hooks, Position(epoch, index + 1), batches_per_epoch, sums, stop.requested)
            progress.remove_task(batch_task)
            _finish_epoch(spec, hooks, epoch, sums, schedule, t0, images, index + 1, records)
            progress.update(epochs_task, completed=epoch + 1)
            if epoch == spec.epochs - 1 or (epoch + 1) % max(1, spec.checkpoint_every) == 0:
                hooks.save(Position(epoch + 1, 0), None)
    return records


def _check_sizes(spec: LoopSpec) -> None:
    n = len(spec.dataset)  # type: ignore[arg-type]
    if n < spec.global_batch:
        raise TrainingError(
            f"the training set has {n} examples, fewer than one batch of {spec.global_batch}: lower the batch size"
        )
    if spec.global_batch < spec.ctx.world_size:
        raise TrainingError(
            f"a global batch of {spec.global_batch} cannot be split across {spec.ctx.world_size} processes"
        )


def _progress(ctx: DistContext, console: Any) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not ctx.is_main,
        transient=False,
    )


def _step(spec: LoopSpec, hooks: LoopHooks, batch: Batch, stop_requested: bool) -> tuple[torch.Tensor, bool]:
    """One optimiser step: compute, all-reduce [sums…, stop flag], check finiteness, update.

    Returns the batch's global sums and whether any rank was asked to stop.
    """
    local = hooks.compute(batch).detach().to(torch.float64).cpu()
    flag = torch.tensor([1.0 if stop_requested else 0.0], dtype=torch.float64)
    reduced = _all_reduce(torch.cat([local, flag]), spec.ctx)
    step_sums, stop_now = reduced[:-1], bool(reduced[-1] > 0)
    if not torch.isfinite(step_sums).all():
        raise TrainingError(
            f"non-finite loss at epoch {batch.epoch}, batch {batch.index} "
            f"({', '.join(f'{k}={v:.4g}' for k, v in zip(spec.sums, step_sums.tolist()))}); "
            "the last good checkpoint is kept — lower the learning rate or check the data"
        )
    hooks.update()
    return step_sums, stop_now


def _save_and_stop(
    hooks: LoopHooks, position: Position, batches_per_epoch: int, sums: torch.Tensor, signal_name: str | None
) -> None:
    """Write a consistent checkpoint at ``position`` (the next batch to run) and raise ``TrainingInterrupted``."""
    if position.batch == batches_per_epoch:
        position = Position(position.epoch + 1, 0)
        hooks.save(position, None)
    else:
        hooks.save(position, sums.tolist())
    raise TrainingInterrupted(
        f"stopped by {signal_name or 'a signal on another rank'} at epoch {position.epoch}, "
        f"batch {position.batch}: a consistent checkpoint was saved — continue with --resume"
    )


def _finish_epoch(
    spec: LoopSpec,
    hooks: LoopHooks,
    epoch: int,
    sums: torch.Tensor,
    schedule: dict[str, float],
    t0: float,
    images: int,
    batches: int,
    records: list[dict[str, Any]],
) -> None:
    elapsed = time.perf_counter() - t0
    record = {
        "epoch": epoch,
        **hooks.display(sums.tolist()),
        **schedule,
        "batches": batches,
        "images_per_s": images / max(elapsed, 1e-9),
        "time_s": elapsed,
    }
    records.append(record)
    if spec.ctx.is_main and spec.metrics_path is not None:
        append_metrics(spec.metrics_path, record)
