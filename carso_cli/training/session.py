"""A training session: everything both trainings do around their model, optimiser and step.

``train-purifier`` and ``train-classifier`` differ in what they train and how a step computes its loss;
the rest is one procedure, here once (timm's ``resume_checkpoint`` is the model: one restore for every
script). In order:

1. ``Session.begin``: with ``--resume``, rank 0 finds the training, says when it is already complete,
   takes its lock; every rank reads the checkpoint (position, seed, RNG). A new training refuses a
   destination that holds one, before anything is downloaded, and seeds every rank.
2. (the command checks its own inputs, e.g. the purifier loads its classifier)
3. ``Session.load_data``: rank 0 builds (downloads) the dataset first, then the other ranks; only then
   are a new training's files made and locked (a failed start leaves nothing, issue 7) and the config
   written.
4. ``Session.restore`` (model, optimiser, RNG), ``channels_last``, ``parallel`` (DDP), ``autocast``.
5. ``Session.loop``: the metrics of epochs being redone are dropped, then ``run_loop`` with the
   session's ``update`` and ``save``.

Only rank 0 writes files; every refusal on rank 0 is raised on every rank (``distributed.on_main``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli import data, distributed, locking
from carso_cli.config import Config, config_to_toml, load_config
from carso_cli.distributed import DistContext
from carso_cli.errors import CarsoError, CheckpointError
from carso_cli.training import state as st
from carso_cli.training.batchnorm import convert_sync_batchnorm
from carso_cli.training.loop import Batch, LoopHooks, LoopSpec, run_loop
from carso_cli.training.metrics import truncate_metrics
from carso_cli.training.randomness import derived_seed, gather_rng, seed_everything


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """Where one training writes: the purifier's run directory, or the files beside a classifier's weights."""

    where: Path  # what messages name: the run directory, or the weights file
    folder: Path  # locked while training; a failed start removes what it made there
    checkpoint: Path  # the full training state (--resume)
    final: Path  # the trained weights, written after the last checkpoint when the training is complete
    config: Path
    metrics: Path
    taken: str  # the refusal when a new training finds one at this place
    started_hint: str  # how --resume explains a missing checkpoint
    lock_file: str = locking.LOCK_FILE
    prefix: str = ""  # the training's own entries of ``folder`` start so ("": the whole folder is the run's)

    def refuse_existing(self) -> None:
        if self.checkpoint.is_file() or self.final.is_file():
            raise CarsoError(self.taken)


@dataclasses.dataclass
class Place:
    """How a training finds its files (each callable runs on rank 0; the result is shared)."""

    known: RunFiles | None  # a new training's files when known before the data (refused early if taken)
    resumed: Callable[[], RunFiles]  # the training --resume continues
    new: Callable[[], tuple[RunFiles, bool]]  # a new training's files, and whether their folder is new


@dataclasses.dataclass
class Options:
    """What the caller chose for a training (the preset holds the rest)."""

    kind: str  # "purifier" or "classifier": the training state's kind
    epochs: int
    global_batch: int
    resume: bool = False
    seed: int = 0
    bf16: bool | None = None  # autocast to bfloat16 on CUDA (None: the preset's training.bf16)
    preset: str | None = None  # with resume: the --preset given again (checked to be the run's)
    data_root: Path = Path("data")

    def __post_init__(self) -> None:
        self.data_root = Path(self.data_root)


class Steps(Protocol):
    """A training's own part of the loop (``LoopHooks``): the session supplies ``update`` and ``save``."""

    sums: list[str]  # names of the per-batch sums ``compute`` returns; the last one is the example count

    def start_epoch(self, epoch: int) -> dict[str, float]: ...  # set the epoch's LR (β); what to log

    def compute(self, batch: Batch) -> torch.Tensor: ...  # forward and backward; the local sums (float64)

    def display(self, sums: list[float]) -> dict[str, float]: ...  # per-example metrics from the sums


def saved_config(path: Path, overrides: dict[str, Any], missing: str) -> Config:
    """The config a resumed training continues with: its saved ``config.toml`` plus ``overrides``
    (``--set``, ``--epochs`` …, checked as a preset's); ``missing`` says what is wrong if there is none."""
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {missing}")
    return load_config(path, overrides)


@contextmanager
def distributed_run(device: torch.device | None) -> Iterator[tuple[DistContext, ExitStack]]:
    """The process group (joined under torchrun) and a stack for the run's lock and the removal of a
    failed start; the group is left at the end, whatever happens."""
    ctx = distributed.setup(device or default_device())
    try:
        with ExitStack() as stack:
            yield ctx, stack
    finally:
        distributed.teardown()


@contextmanager
def seeded(seed: int, salt: int) -> Iterator[None]:
    """Draws from ``derived_seed(seed, salt)`` without touching the global RNG (the same initial weights on
    every rank, and on resume)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, salt))
        yield


class Session:
    """One training's run: its files, lock, state, devices and loop (see the module docstring)."""

    def __init__(self, cfg: Config, ctx: DistContext, opts: Options, stack: ExitStack, console: Any = None) -> None:
        self.cfg, self.ctx, self.opts, self.stack, self.console = cfg, ctx, opts, stack, console
        self.seed = opts.seed
        self.files: RunFiles | None = None
        self.state: st.TrainingState | None = None
        self.start = st.Position()
        self.spec: LoopSpec | None = None
        self.on_cuda = ctx.device.type == "cuda"
        self.use_bf16 = self.on_cuda and (cfg.training.bf16 if opts.bf16 is None else opts.bf16)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def run(self) -> Path:
        assert self.files is not None, "begin() first"
        return self.files.where

    def say(self, line: str) -> None:
        if self.ctx.is_main and self.console is not None:
            self.console.print(line, soft_wrap=True, markup=False)  # may quote a library's message

    # -- opening ------------------------------------------------------------------------------------

    def begin(self, place: Place) -> str | None:
        """Resume: find, check and lock the training, read its state; returns the line saying it is
        complete if it is (then nothing is locked or touched). New: refuse a taken place, seed."""
        if not self.opts.resume:
            if place.known is not None:
                distributed.on_main(self.ctx, place.known.refuse_existing)  # before a download
            seed_everything(self.seed, self.ctx.rank)
            return None
        files, done = distributed.on_main(self.ctx, lambda: self._find(place))
        self.files = files
        if done is not None:
            return done
        self.state = st.load_training_state(files.checkpoint, self.opts.kind)
        st.check_resume(self.state, self.opts.global_batch, self.opts.preset, self.cfg.name)
        self.seed = int(self.state.extra.get("seed", self.seed))
        return None

    def _find(self, place: Place) -> tuple[RunFiles, str | None]:
        files = place.resumed()
        if not files.checkpoint.is_file():
            raise CheckpointError(f"cannot resume: {files.checkpoint} not found ({files.started_hint})")
        done = st.finished_run(files.checkpoint, files.final, self.opts.epochs, files.where)
        if done is None:
            self._lock(files, made=False)
        return files, done

    def _lock(self, files: RunFiles, made: bool) -> None:
        """Rank 0 takes the training's lock (on the session's stack); a new training is refused again
        under it (the check before was only to fail early) and removed if it fails before a checkpoint."""
        self.stack.enter_context(locking.hold(files.folder, lock_file=files.lock_file))
        for folder in dict.fromkeys((files.folder, files.checkpoint.parent)):  # what a killed run was writing
            ckpt.remove_temporaries(folder, files.prefix)  # (issue 14)
        if not self.opts.resume:
            files.refuse_existing()
            keep = [files.checkpoint, files.final]
            self.stack.enter_context(ckpt.undo_on_failure(files.folder, made, keep, prefix=files.prefix, tell=True))
        # A write that fails (a full disk) from here on says which checkpoint is intact.
        self.stack.enter_context(ckpt.checkpoint_write(files.checkpoint))

    def _create(self, place: Place) -> RunFiles:
        files, made = place.new()
        self._lock(files, made)
        return files

    def load_data(self, place: Place) -> torch.utils.data.Dataset:
        """The training split: built on rank 0 first (it downloads), then on the others. A new training's
        files are made and locked after (inputs are checked before anything is written, issue 7)."""
        cfg, root = self.cfg, self.opts.data_root
        if self.ctx.is_main:
            dataset = data.build_dataset(cfg, "train", root=root, download=True, augment=cfg.data.augment)
        distributed.barrier(self.ctx)
        if not self.ctx.is_main:
            dataset = data.build_dataset(cfg, "train", root=root, download=False, augment=cfg.data.augment)
        if not self.opts.resume:
            self.files = distributed.on_main(self.ctx, lambda: self._create(place))
        if self.ctx.is_main:
            ckpt.atomic_write_text(self.run_files.config, config_to_toml(self.cfg))
        return dataset

    @property
    def run_files(self) -> RunFiles:
        assert self.files is not None, "begin() / load_data() first"
        return self.files

    # -- model, optimiser, devices ------------------------------------------------------------------

    def sync_batchnorm(self, model: nn.Module) -> nn.Module:
        """BatchNorm over the global batch (SyncBatchNorm) when several processes train."""
        return convert_sync_batchnorm(model, self.device) if self.ctx.distributed else model  # type: ignore[return-value]

    def restore(self, model: nn.Module, optimizer: Any) -> st.Position:
        """Load a resumed training's model, optimiser and this rank's RNG; the position to start from."""
        if self.state is not None:
            files = self.run_files
            ckpt.load_into(model, self.state.model, what=f"{self.opts.kind} in {files.checkpoint}")
            st.load_optimizer_state(optimizer, self.state.optimizer)
            st.restore_rank_rng(self.state, self.ctx)
            self.start = self.state.position  # ≤ epochs (finished_run); the final files may be what is left
            self.say(
                f"resumed from epoch {self.start.epoch}, batch {self.start.batch} "
                f"(of {self.opts.epochs} epochs): {files.where}"
            )
        return self.start

    def channels_last(self, *modules: nn.Module) -> None:
        """On CUDA: cuDNN autotuning and the channels-last layout its convolutions run fastest in."""
        if self.on_cuda:
            torch.backends.cudnn.benchmark = True
            for module in modules:
                module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def parallel(self, module: nn.Module) -> nn.Module:
        """``module`` under DDP when several processes train (gradients averaged over ranks)."""
        if not self.ctx.distributed:
            return module
        return nn.parallel.DistributedDataParallel(module, device_ids=[self.device.index] if self.on_cuda else None)

    def no_sync(self, module: nn.Module) -> Any:
        """DDP's ``no_sync`` for gradient accumulation (None in one process)."""
        return module.no_sync if self.ctx.distributed else None  # type: ignore[operator]

    def autocast(self) -> AbstractContextManager[Any]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    def batch(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's (x, y) on the device (x channels-last on CUDA)."""
        x = b.x.to(self.device, non_blocking=True)
        y = b.y.to(self.device, non_blocking=True)
        if self.on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    # -- the loop -----------------------------------------------------------------------------------

    def loop(
        self, dataset: torch.utils.data.Dataset, model: nn.Module, optimizer: Any, steps: Steps, **spec: Any
    ) -> list[dict[str, Any]]:
        """Train from ``self.start`` to the end (``run_loop``); returns the epochs' records. ``spec``: the
        rest of ``LoopSpec`` (title, drop_last …)."""
        ctx, files = self.ctx, self.run_files
        if ctx.is_main:  # the epochs being redone are written again
            if self.opts.resume:
                truncate_metrics(files.metrics, self.start.epoch)
            elif files.metrics.exists():
                files.metrics.unlink()
        self.spec = LoopSpec(
            ctx=ctx,
            dataset=dataset,
            global_batch=self.opts.global_batch,
            epochs=self.opts.epochs,
            seed=self.seed,
            sums=steps.sums,
            num_workers=self.cfg.data.num_workers,
            checkpoint_every=self.cfg.training.checkpoint_every,
            metrics_path=files.metrics if ctx.is_main else None,
            **spec,
        )

        def update() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def save(position: st.Position, epoch_sums: list[float] | None) -> None:
            self.save(position, epoch_sums, model, optimizer)

        hooks = LoopHooks(steps.start_epoch, steps.compute, update, steps.display, save)
        epoch_sums = self.state.epoch_sums if self.state is not None else None
        return run_loop(self.spec, hooks, self.start, epoch_sums, console=self.console)

    def save(self, position: st.Position, epoch_sums: list[float] | None, model: nn.Module, optimizer: Any) -> None:
        """A consistent checkpoint: every rank's RNG gathered, rank 0 writes (called on every rank)."""
        rng = gather_rng(self.ctx)
        if self.ctx.is_main:
            st.save_training_state(
                self.run_files.checkpoint,
                kind=self.opts.kind,
                position=position,
                model=model,
                optimizer=optimizer,
                config_toml=config_to_toml(self.cfg),
                rng=rng,
                epoch_sums=epoch_sums,
                extra={"seed": self.seed, "world_size": self.ctx.world_size, "global_batch": self.opts.global_batch},
            )
        distributed.barrier(self.ctx)

    @property
    def resumed_from(self) -> st.Position | None:
        return self.start if self.opts.resume else None
