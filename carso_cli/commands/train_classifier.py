"""``carso train-classifier``: train the preset's classifier, clean or with PGD adversarial training.

For when no published robust classifier can be downloaded (the paper uses published weights, section
5.1), and for the paper's clean-vs-adversarial classifier ablation. PGD adversarial training follows
Madry et al. (2018): every training example is replaced by a PGD attack at the preset's ε
(``classifier_training.pgd_steps`` sign steps of ``pgd_step_size`` from a uniform random start) and the
model is trained on those. SGD with momentum and weight decay, the LR annealed by a cosine per batch.

The same data, DDP, progress, checkpoint and resume machinery as ``train-purifier`` (``training.py``).
Files, for ``--out DIR/NAME.safetensors``: the weights ``NAME.safetensors`` (which
``train-purifier --classifier`` accepts) and, beside them, ``NAME.state.safetensors`` (full training
state, for ``--resume``), ``NAME.config.toml``, ``NAME.metrics.jsonl`` and ``NAME.curves.png``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import ExitStack, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import torch.nn.functional as F
import typer
from torch import nn

from carso_cli import attacks, distributed, locking, memory
from carso_cli import checkpoint as ckpt
from carso_cli import training as tr
from carso_cli.commands._common import (
    ClassifierAttackChunkOpt,
    ClassifierMicroBatchOpt,
    DataRootOpt,
    DeviceOpt,
    GpusOpt,
    SeedOpt,
    SetOpt,
    load_preset,
    memory_sets,
    resolve_device,
)
from carso_cli.config import (
    Config,
    apply_overrides,
    config_to_toml,
    load_config,
    parse_override,
)
from carso_cli.errors import CarsoError, CheckpointError, ConfigError
from carso_cli.models import build_classifier
from carso_cli.training.bounds import Bounds, pieces, run_bounded

KIND = "classifier"
SUMS = ["loss", "correct", "count"]
CLASSIFIER_FORMAT = "carso-classifier"


class Adversarial(str, Enum):
    pgd = "pgd"
    none = "none"


@dataclasses.dataclass
class ClassifierResult:
    weights: Path
    resumed_from: tr.Position | None
    records: list[dict[str, Any]]
    clean_accuracy: float
    complete: str | None = None  # --resume of a finished training: the line that says so (nothing was done)


def companion(weights: Path, what: str) -> Path:
    """``NAME.safetensors`` → ``NAME.<what>`` (state.safetensors, config.toml, metrics.jsonl, curves.png)."""
    return weights.with_name(weights.name.removesuffix(".safetensors") + "." + what)


def default_out(cfg: Config) -> Path:
    kind = "pgd" if cfg.classifier_training.adversarial == "pgd" else "clean"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return ckpt.RUNS_ROOT / "classifiers" / f"{cfg.name}-{kind}-{stamp}.safetensors"


def resume_config(out: Path, sets: list[str] | None = None, epochs: int | None = None) -> Config:
    """The config a resumed classifier training continues with (``NAME.config.toml`` + overrides)."""
    path = companion(out, "config.toml")
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found (was training started with --out {out}?)")
    cfg = load_config(path)
    overrides: dict[str, Any] = dict(parse_override(s) for s in sets or [])
    if epochs is not None:
        overrides["classifier_training.epochs"] = epochs
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg


def clean_accuracy(
    model: nn.Module, dataset: torch.utils.data.Dataset, device: torch.device, batch_size: int = 256
) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``dataset``."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
    return correct / max(total, 1)


# Examples over which the BatchNorm statistics are re-estimated at the end of training.
PRECISE_BN_EXAMPLES = 1024


def recalibrate_bn(model: nn.Module, spec: tr.LoopSpec, make_input: Any, epoch: int) -> None:
    """Re-estimate BatchNorm running statistics as exact averages over ~1k training inputs ("precise BN").

    The DeepMind WideResNet's BatchNorm momentum is 0.01: its running statistics need several hundred
    steps to forget their initial values, more than a short run (the smoke preset) takes, and an
    eval-mode model with stale statistics is near chance. Averaging the statistics of the same inputs
    training used (PGD examples for adversarial training, from the train-mode model, whose attack
    forwards also count as in training) fixes that and costs a fraction of an epoch. All ranks take part
    (SyncBatchNorm), with the data order of an extra epoch ``epoch``.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    batches = max(1, min(len(spec.dataset) // spec.global_batch, -(-PRECISE_BN_EXAMPLES // spec.global_batch)))  # type: ignore[arg-type]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    try:
        for b in tr.local_batches(spec, epoch):
            if b.index >= batches:
                break
            x = make_input(b)
            with torch.no_grad():
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def run(
    cfg: Config,
    out: Path | None = None,
    *,
    device: torch.device | None = None,
    resume: bool = False,
    data_root: Path = Path("data"),
    seed: int = 0,
    bf16: bool | None = None,
    evaluate: bool = True,
    console: Any = None,
    preset: str | None = None,
) -> ClassifierResult:
    """Train (or resume) the preset's classifier; returns the path of its weights.

    ``cfg.classifier_training.adversarial`` chooses PGD adversarial training or standard training.
    ``evaluate``: report the clean accuracy on the test split at the end (rank 0). ``preset``: with
    ``resume``, the ``--preset`` given again (checked to be the run's), if any.
    """
    if out is not None and not str(out).endswith(".safetensors"):
        raise ConfigError(f"--out must name a .safetensors file, got {out}")
    if resume and out is None:
        raise CarsoError("--resume needs --out FILE.safetensors (the weights file of the run to continue)")
    ctx = distributed.setup(device or resolve_device(None))
    try:
        with ExitStack() as stack:  # the weights' lock, and the removal of a failed start
            return _train(cfg, out, ctx, resume, Path(data_root), seed, bf16, evaluate, console, preset, stack)
    finally:
        distributed.teardown()


def _train(
    cfg: Config,
    out: Path | None,
    ctx: distributed.DistContext,
    resume: bool,
    data_root: Path,
    seed: int,
    bf16: bool | None,
    evaluate: bool,
    console: Any,
    preset: str | None,
    stack: ExitStack,
) -> ClassifierResult:
    from carso_cli import data

    device = ctx.device
    ct = cfg.classifier_training
    weights = Path(distributed.broadcast_object(str(out or default_out(cfg)), ctx))
    state_path = companion(weights, "state.safetensors")
    stem = weights.name.removesuffix(".safetensors")

    def refuse_existing() -> None:
        if weights.exists() or state_path.exists():
            raise CarsoError(
                f"{weights} (or its training state) already exists: pass --resume to continue, or another --out"
            )

    def lock() -> None:
        # One writer per weights file: the lock file sits beside it (a folder may hold several).
        made = not weights.parent.exists()
        stack.enter_context(locking.hold(weights.parent, lock_file=f".{weights.name}.lock"))
        ckpt.remove_temporaries(weights.parent, f"{stem}.")  # what a killed run was writing (issue 14)
        if not resume:
            refuse_existing()  # again under the lock: the check before it was only to fail early
            stack.enter_context(
                ckpt.undo_on_failure(weights.parent, made, keep=[state_path, weights], prefix=f"{stem}.", tell=True)
            )
        # A write that fails (a full disk) from here on says which checkpoint is intact.
        stack.enter_context(ckpt.checkpoint_write(state_path))

    state: tr.TrainingState | None = None
    if resume:
        if not state_path.is_file():
            raise CheckpointError(f"cannot resume: {state_path} not found (was training started with --out {weights}?)")
        done = distributed.on_main(ctx, lambda: tr.finished_run(state_path, weights, ct.epochs, weights))
        if done is not None:
            return ClassifierResult(weights, None, [], float("nan"), complete=done)
        distributed.on_main(ctx, lock)
        state = tr.load_training_state(state_path, KIND)
        tr.check_resume(state, ct.batch_size, preset, cfg.name)
        seed = int(state.extra.get("seed", seed))
    else:
        distributed.on_main(ctx, refuse_existing)  # before a download
        tr.seed_everything(seed, ctx.rank)

    # The data is checked before anything is written (issue 7: a failed start leaves nothing).
    if ctx.is_main:
        dataset = data.build_dataset(cfg, "train", root=data_root, download=True, augment=cfg.data.augment)
    distributed.barrier(ctx)
    if not ctx.is_main:
        dataset = data.build_dataset(cfg, "train", root=data_root, download=False, augment=cfg.data.augment)
    if not resume:
        distributed.on_main(ctx, lock)
    if ctx.is_main:
        ckpt.atomic_write_text(companion(weights, "config.toml"), config_to_toml(cfg))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tr.derived_seed(seed, 13))
        model = build_classifier(cfg).to(device)
    if ctx.distributed:
        model = tr.convert_sync_batchnorm(model, device)  # type: ignore[assignment]
    optimizer = torch.optim.SGD(model.parameters(), lr=ct.lr, momentum=ct.momentum, weight_decay=ct.weight_decay)
    start = tr.Position()
    if state is not None:
        ckpt.load_into(model, state.model, what=f"classifier in {state_path}")
        tr.load_optimizer_state(optimizer, state.optimizer)
        tr.restore_rank_rng(state, ctx)
        start = state.position  # at most ct.epochs (tr.finished_run); the final files may be what is left
        if ctx.is_main and console is not None:
            console.print(
                f"resumed from epoch {start.epoch}, batch {start.batch} (of {ct.epochs} epochs): {weights}",
                soft_wrap=True,
                markup=False,
            )

    on_cuda = device.type == "cuda"
    use_bf16 = on_cuda and (cfg.training.bf16 if bf16 is None else bf16)
    if on_cuda:
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_cuda else None)
    model.train()

    batches_per_epoch = len(dataset) // ct.batch_size  # type: ignore[arg-type]
    total_steps = ct.epochs * batches_per_epoch
    adversarial = ct.adversarial == "pgd"
    eps = cfg.attacks.eps
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    def start_epoch(epoch: int) -> dict[str, float]:
        return {"lr": tr.cosine_lr(ct.lr, epoch * batches_per_epoch, total_steps)}

    bounds = Bounds.parse(ct.attack_chunk, ct.micro_batch)

    def footprint(n: int) -> tuple[int, int, int]:  # for "auto": static bytes, per attacked, per trained example
        fp = memory.measure(cfg)
        return memory.classifier_training_static(fp, n), fp.per_example.attack, fp.per_example.attack

    def make_input(b: tr.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(training input, labels) of a batch: PGD examples (adversarial training) or the clean ones."""
        x = b.x.to(device, non_blocking=True)
        y = b.y.to(device, non_blocking=True)
        if on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        bounds.resolve(x.shape[0], device, lambda: footprint(x.shape[0]))
        if adversarial:
            # Madry et al.: PGD from a uniform random start, drawn for the global batch (rank-independent).
            # The model stays in train mode, as in Madry et al.'s and Rice et al.'s training code; its
            # (synchronised) BatchNorm then runs collectives, so every rank attacks in as many chunks.
            gen = tr.batch_generator(device, seed, b.epoch, b.index, 3)
            noise = torch.rand((b.global_size, *x.shape[1:]), generator=gen, device=device)[b.lo : b.hi]
            with autocast():
                x = attacks.in_chunks(
                    attacks.pgd,
                    bounds.attack_chunk,
                    model,
                    x,
                    y,
                    eps,
                    ct.pgd_steps,
                    ct.pgd_step_size,
                    start_noise=noise,
                    parts=pieces(b.global_size, ctx.world_size, bounds.attack_chunk),
                )
        return x, y

    def say(line: str) -> None:
        if ctx.is_main and console is not None:
            console.print(line, soft_wrap=True, markup=False)  # may quote a library's message

    def compute(b: tr.Batch) -> torch.Tensor:
        n = b.hi - b.lo

        def fits() -> dict[str, int]:
            return memory.classifier_fitting_options(
                memory.measure(cfg), torch.cuda.get_device_properties(device).total_memory, n
            )

        return run_bounded(
            lambda: compute_bounded(b), bounds, n, device, lambda: optimizer.zero_grad(set_to_none=True), fits, say
        )

    def compute_bounded(b: tr.Batch) -> torch.Tensor:
        for group in optimizer.param_groups:
            group["lr"] = tr.cosine_lr(ct.lr, b.epoch * batches_per_epoch + b.index, total_steps)
        x, y = make_input(b)

        def step(rows: slice) -> torch.Tensor:
            with autocast():
                logits = net(x[rows])
            loss = F.cross_entropy(logits.float(), y[rows], reduction="sum")
            # DDP averages gradients over ranks: Σ_local / B_global · world = the global batch mean.
            (loss * (ctx.world_size / b.global_size)).backward()
            correct = (logits.detach().argmax(1) == y[rows]).sum()
            return torch.stack([loss.detach().double(), correct.double()])

        sums = tr.accumulate(
            x.shape[0],
            bounds.micro_batch,
            step,
            net.no_sync if ctx.distributed else None,  # type: ignore[arg-type]
            parts=pieces(b.global_size, ctx.world_size, bounds.micro_batch),
        )
        return torch.cat([sums, torch.tensor([float(y.shape[0])], device=sums.device, dtype=torch.float64)])

    def update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def display(sums: list[float]) -> dict[str, float]:
        n = max(sums[2], 1.0)
        return {"loss": sums[0] / n, "accuracy": sums[1] / n}

    def save(position: tr.Position, epoch_sums: list[float] | None) -> None:
        rng = tr.gather_rng(ctx)
        if ctx.is_main:
            tr.save_training_state(
                state_path,
                kind=KIND,
                position=position,
                model=model,
                optimizer=optimizer,
                config_toml=config_to_toml(cfg),
                rng=rng,
                epoch_sums=epoch_sums,
                extra={"seed": seed, "world_size": ctx.world_size, "global_batch": ct.batch_size},
            )
        distributed.barrier(ctx)

    metrics = companion(weights, "metrics.jsonl")
    if ctx.is_main:
        if resume:
            tr.truncate_metrics(metrics, start.epoch)
        elif metrics.exists():
            metrics.unlink()
    kind = "PGD adversarial" if adversarial else "standard"
    spec = tr.LoopSpec(
        ctx=ctx,
        dataset=dataset,
        global_batch=ct.batch_size,
        epochs=ct.epochs,
        seed=seed,
        sums=SUMS,
        title=f"classifier, {kind} ({cfg.name})",
        num_workers=cfg.data.num_workers,
        checkpoint_every=cfg.training.checkpoint_every,
        metrics_path=metrics if ctx.is_main else None,
    )
    records = tr.run_loop(
        spec,
        tr.LoopHooks(start_epoch, compute, update, display, save),
        start,
        state.epoch_sums if state is not None else None,
        console=console,
    )

    recalibrate_bn(model, spec, lambda b: make_input(b)[0], ct.epochs)
    accuracy = float("nan")
    if ctx.is_main:
        model.eval()
        if evaluate:
            test = data.build_dataset(cfg, "test", root=data_root, download=True, augment=False)
            accuracy = clean_accuracy(model, test, device)
        meta = {
            "format": CLASSIFIER_FORMAT,
            "preset": cfg.name,
            "adversarial": ct.adversarial,
            "epochs": str(ct.epochs),
            "eps": repr(eps),
            "clean_accuracy": repr(accuracy),
        }
        ckpt.save_tensors(weights, model.state_dict(), meta)
        from carso_cli.commands.plot import plot_metrics

        plot_metrics(metrics, companion(weights, "curves.png"), title=f"classifier — {weights.name}")
    distributed.barrier(ctx)
    return ClassifierResult(weights, start if resume else None, records, accuracy)


def cli(
    ctx: typer.Context,
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="Preset name or .toml (not needed with --resume).")
    ] = None,
    adversarial: Annotated[
        Adversarial | None, typer.Option("--adversarial", help="pgd (Madry et al.) or none (default: the preset's).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Weights file (default runs/classifiers/<preset>-<kind>-<timestamp>.safetensors)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Epochs (overrides classifier_training.epochs).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Global batch size (split across processes).")
    ] = None,
    gpus: GpusOpt = 1,
    device: DeviceOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the training of --out from its last checkpoint.")
    ] = False,
    data_root: DataRootOpt = Path("data"),
    seed: SeedOpt = 0,
    bf16: Annotated[
        bool | None,
        typer.Option("--bf16/--no-bf16", help="bfloat16 autocast on CUDA (default: the preset's training.bf16)."),
    ] = None,
    set_: SetOpt = None,
    attack_chunk: ClassifierAttackChunkOpt = None,
    micro_batch: ClassifierMicroBatchOpt = None,
) -> None:
    """Train the preset's classifier (PGD adversarial or standard); prints the weights' path."""
    from carso_cli.cli import console, debug_enabled

    set_ = memory_sets(set_, attack_chunk, micro_batch, section="classifier_training")
    explicit = {
        "classifier_training.epochs": epochs,
        "classifier_training.batch_size": batch_size,
        "classifier_training.adversarial": adversarial.value if adversarial else None,
    }
    if distributed.should_relaunch(gpus):
        distributed.check_gpus(gpus, device)
        if out is None and not resume and preset is not None:  # named here, for the line that says how to resume
            out = default_out(load_preset(preset, set_, **explicit))
        argv = distributed.relaunch_argv(ctx, out=out)  # every option as parsed, --no-x included
        try:
            raise typer.Exit(distributed.relaunch(gpus, argv, debug=debug_enabled()))
        except distributed.RankDied as died:
            state = companion(out, "state.safetensors") if out is not None else None
            kept = ckpt.intact_checkpoint(state) if state is not None else None
            raise died.resumable(kept and f"{kept} is intact ({state})", argv) from None
    if resume:
        if out is None:
            raise CarsoError("--resume needs --out FILE.safetensors (the weights file of the run to continue)")
        cfg = resume_config(out, set_, epochs)
        if batch_size is not None:
            cfg.classifier_training.batch_size = batch_size  # checked against the run's
    else:
        if preset is None:
            raise CarsoError("--preset is required (or --resume with --out)")
        cfg = load_preset(preset, set_, **explicit)
    result = run(
        cfg,
        out,
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
        return
    if result.clean_accuracy == result.clean_accuracy:  # not NaN
        console.print(f"clean test accuracy: {100 * result.clean_accuracy:.2f}%")
    console.print(str(result.weights), soft_wrap=True, highlight=False, markup=False)
