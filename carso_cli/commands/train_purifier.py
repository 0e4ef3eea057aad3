"""``carso train-purifier``: train the purifier against a frozen classifier (sections 4.4 and 5.1).

Each step: an adversarially-balanced batch (a preset fraction of it attacked by FGSM/PGD at ε/2 and ε
against the classifier), the classifier's representation of it, the purifier's VAE pass, and the loss —
summed BCE to the *clean* image plus β·KL — optimised by RAdam inside Lookahead with the per-epoch
LR schedule of Table 16. Runs in one process or under torchrun (DDP + SyncBatchNorm, the preset's batch
being the global one); every random draw depends on (seed, epoch, batch) only, so N processes
compute what one does and a resumed run ends where an uninterrupted one ends.

Several GPUs: ``--gpus N`` re-runs the command under torchrun. Several nodes: start torchrun yourself on
every node, e.g. ``torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500
-m carso_cli train-purifier --preset cifar10 --classifier W --out /shared/runs/cifar10`` (the run
directory must be on a shared file system; only global rank 0 writes to it).
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli import distributed, locking, memory
from carso_cli import training as tr
from carso_cli.commands._common import (
    AttackChunkOpt,
    CompileOpt,
    DataRootOpt,
    DeviceOpt,
    GpusOpt,
    MicroBatchOpt,
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
from carso_cli.config import eps_scale as config_eps_scale
from carso_cli.errors import CarsoError, CheckpointError
from carso_cli.models import (
    Purifier,
    build_purifier,
    set_eval_frozen,
    sources,
    write_run,
)
from carso_cli.models.representation import forward_with_representation
from carso_cli.training.bounds import Bounds, pieces, run_bounded
from carso_cli.training.compiled import check_backend, maybe_compile

CHECKPOINT = Path("checkpoints") / "last.safetensors"
CURVES_FILE = "curves.png"
KIND = "purifier"
SUMS = ["loss", "bce", "kl", "count"]


class PurifierTrainStep(nn.Module):
    """The purifier's training pass with its reparameterisation noise given from outside.

    The noise ε ~ N(0, I) is drawn for the global batch from a (seed, epoch, batch) generator, so it does
    not depend on how the batch is split across ranks. Wrapping the pass in one module lets DDP see it.
    """

    def __init__(self, purifier: Purifier) -> None:
        super().__init__()
        self.purifier = purifier

    def forward(
        self, x: torch.Tensor, representation: list[torch.Tensor], noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) purifier input; noise: (B, fjoint). Returns (reconstruction, μ, log σ²)."""
        p = self.purifier
        if p.input_encoder is None or p.joint_encoder is None:
            raise RuntimeError("an inference-only purifier cannot be trained")
        c = p.condition_encoder(representation)
        mu, logvar = p.joint_encoder(p.input_encoder(x), c)
        z = mu + noise.to(mu.dtype) * torch.exp(0.5 * logvar)  # reparameterisation trick
        return p.decoder(z, c), mu, logvar


@dataclasses.dataclass
class PurifierResult:
    run: Path
    resumed_from: tr.Position | None
    records: list[dict[str, Any]]
    complete: str | None = None  # --resume of a finished run: the line that says so (nothing was done)


def _run_dir(
    out: Path | None, cfg: Config, resume: bool, ctx: distributed.DistContext, stack: ExitStack
) -> tuple[Path, str | None]:
    """The run directory, made and locked by rank 0 and broadcast (so a default timestamped name is shared),
    and, with ``resume``, the line saying the run is complete if it is (then nothing is locked or touched).

    Rank 0 holds the run's lock (``locking``) on ``stack``; a new run made here is removed again if the
    start fails before its first checkpoint. A refusal on rank 0 is raised on every rank.
    """

    def make() -> tuple[str, str | None]:
        if resume:
            run = Path(out) if out is not None else ckpt.latest_run(require=str(CHECKPOINT))
            if not (run / CHECKPOINT).is_file():
                raise CheckpointError(f"cannot resume: {run / CHECKPOINT} not found (was this run started?)")
            done = tr.finished_run(run / CHECKPOINT, run / ckpt.PURIFIER_FILE, cfg.training.epochs, run)
            if done is not None:
                return str(run), done
            stack.enter_context(locking.hold(run))
        else:
            run = ckpt.new_run_dir(cfg.name) if out is None else Path(out)
            made = out is None or not run.exists()
            stack.enter_context(locking.hold(run))
            _refuse_existing(run)  # again under the lock: the check before it was only to fail early
            stack.enter_context(
                ckpt.undo_on_failure(run, made, keep=[run / CHECKPOINT, run / ckpt.PURIFIER_FILE], tell=True)
            )
        # A write that fails (a full disk) from here on says which checkpoint is intact.
        stack.enter_context(ckpt.checkpoint_write(run / CHECKPOINT))
        for folder in (run, (run / CHECKPOINT).parent):  # what a killed run was writing (issue 14)
            ckpt.remove_temporaries(folder)
        return str(run), None

    run, done = distributed.on_main(ctx, make)
    return Path(run), done


def _refuse_existing(run: Path) -> None:
    if (run / CHECKPOINT).is_file() or (run / ckpt.PURIFIER_FILE).is_file():
        raise CarsoError(f"{run} already holds a training run: pass --resume to continue it, or another --out")


def resume_config(run: Path | None, sets: list[str] | None = None, epochs: int | None = None) -> Config:
    """The config a resumed run continues with: its ``config.toml`` plus ``--set`` / ``--epochs``."""
    run = run if run is not None else ckpt.latest_run(require=str(CHECKPOINT))
    if not (run / ckpt.CONFIG_FILE).is_file():
        raise CheckpointError(f"cannot resume: {run} has no {ckpt.CONFIG_FILE}")
    cfg = load_config(run / ckpt.CONFIG_FILE)
    overrides: dict[str, Any] = dict(parse_override(s) for s in sets or [])
    if epochs is not None:
        overrides["training.epochs"] = epochs
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg


def run(
    cfg: Config,
    classifier: Path | None,
    out: Path | None = None,
    *,
    device: torch.device | None = None,
    resume: bool = False,
    data_root: Path = Path("data"),
    seed: int = 0,
    bf16: bool | None = None,
    console: Any = None,
    preset: str | None = None,
) -> PurifierResult:
    """Train (or resume) a purifier; returns the run directory with ``purifier.safetensors`` in it.

    Args:
        cfg: the preset (for ``resume``, ``resume_config(run)``).
        classifier: weights of the preset's classifier (``.safetensors``/``.pt``; None for a ``robustbench:``
            source, loaded through RobustBench, or a ``python:`` factory that returns trained weights);
            when resuming, only compared with the run's (which keeps its own copy).
        out: run directory (default ``runs/<preset>-<timestamp>``; with ``resume``, the latest run).
        bf16: autocast to bfloat16 on CUDA (default: the preset's ``training.bf16``); CPU is float32.
        preset: with ``resume``, the ``--preset`` given again (checked to be the run's), if any.
    """
    check_backend(cfg.training.compile)  # before anything is written
    ctx = distributed.setup(device or resolve_device(None))
    try:
        with ExitStack() as stack:  # the run's lock, and the removal of a failed start
            return _train(cfg, classifier, out, ctx, resume, Path(data_root), seed, bf16, console, preset, stack)
    finally:
        distributed.teardown()


def _train(
    cfg: Config,
    classifier_path: Path | None,
    out: Path | None,
    ctx: distributed.DistContext,
    resume: bool,
    data_root: Path,
    seed: int,
    bf16: bool | None,
    console: Any,
    preset: str | None,
    stack: ExitStack,
) -> PurifierResult:
    from carso_cli import data

    device = ctx.device
    t = cfg.training
    if not resume:
        if classifier_path is None and sources.needs_weights_file(cfg):
            raise CarsoError(
                "--classifier is required: the weights of the preset's (adversarially-trained) classifier"
                + (
                    ""
                    if cfg.classifier.architecture == "wideresnet"
                    else f" ({cfg.classifier.architecture}: --classifier-weights FILE)"
                )
            )
        if classifier_path is not None and not Path(classifier_path).is_file():
            raise CheckpointError(f"--classifier: file not found: {classifier_path}")
    state: tr.TrainingState | None = None
    if resume:
        run_dir, done = _run_dir(out, cfg, resume, ctx, stack)
        if done is not None:
            return PurifierResult(run_dir, None, [], complete=done)
        state = tr.load_training_state(run_dir / CHECKPOINT, KIND)
        tr.check_resume(state, t.batch_size, preset, cfg.name)
        seed = int(state.extra.get("seed", seed))
        classifier_file = ckpt.classifier_path_of(run_dir)
        if classifier_path is not None and not ckpt.same_classifier(classifier_path, run_dir):
            raise CheckpointError(f"--classifier {classifier_path} differs from the classifier of {run_dir}")
    else:
        if out is not None:
            distributed.on_main(ctx, lambda: _refuse_existing(Path(out)))  # before a download
        tr.seed_everything(seed, ctx.rank)

    # Inputs are checked (classifier weights, data) before a new run directory is made (issue 7).
    if resume:
        classifier = sources.load_saved(classifier_file, cfg, device)
    else:
        loaded = sources.load(cfg, classifier_path, device)  # any source (models/sources.py)
        classifier = loaded.model
    set_eval_frozen(classifier)
    if ctx.is_main:
        dataset = data.build_dataset(cfg, "train", root=data_root, download=True, augment=cfg.data.augment)
    distributed.barrier(ctx)  # rank 0 downloads first
    if not ctx.is_main:
        dataset = data.build_dataset(cfg, "train", root=data_root, download=False, augment=cfg.data.augment)
    if not resume:
        run_dir, _ = _run_dir(out, cfg, resume, ctx, stack)
    if ctx.is_main:
        ckpt.atomic_write_text(run_dir / ckpt.CONFIG_FILE, config_to_toml(cfg))
        if not resume:
            record = sources.record(run_dir, loaded)  # the source, the weights' sha256 (for --resume --classifier)
            sources.save(run_dir / ckpt.CLASSIFIER_FILE, classifier, cfg, record.get("sha256"))

    # The same initial purifier on every rank (DDP would broadcast rank 0's anyway).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tr.derived_seed(seed, 11))
        purifier = build_purifier(cfg, classifier).to(device)
    if ctx.distributed:
        purifier = tr.convert_sync_batchnorm(purifier, device)  # type: ignore[assignment]
    radam = torch.optim.RAdam(
        purifier.parameters(),
        lr=tr.lr_at_epoch(t, 0),
        betas=(t.radam_beta1, t.radam_beta2),
        eps=t.radam_eps,
        weight_decay=t.weight_decay,
    )
    optimizer = tr.Lookahead(radam, k=t.lookahead_k, alpha=t.lookahead_alpha)
    start = tr.Position()
    if state is not None:
        ckpt.load_into(purifier, state.model, what=f"purifier in {run_dir / CHECKPOINT}")
        tr.load_optimizer_state(optimizer, state.optimizer)
        tr.restore_rank_rng(state, ctx)
        start = state.position  # at most t.epochs (tr.finished_run); the final files may be what is left
        if ctx.is_main and console is not None:
            console.print(
                f"resumed from epoch {start.epoch}, batch {start.batch} (of {t.epochs} epochs): {run_dir}",
                soft_wrap=True,
                markup=False,
            )

    on_cuda = device.type == "cuda"
    use_bf16 = on_cuda and (t.bf16 if bf16 is None else bf16)
    if on_cuda:
        torch.backends.cudnn.benchmark = True
        classifier.to(memory_format=torch.channels_last)
        purifier.to(memory_format=torch.channels_last)
    step_module: nn.Module = PurifierTrainStep(purifier)
    if ctx.distributed:
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=[device.index] if on_cuda else None)
    purifier.train()

    def say(line: str) -> None:
        if ctx.is_main and console is not None:
            console.print(line, soft_wrap=True, markup=False)  # may quote a library's message

    # torch.compile (training.compile): the classifier as the attacks call it, and the purifier's pass.
    attacked_classifier = maybe_compile(classifier, t.compile, "attacked classifier", say)
    train_pass = maybe_compile(step_module, t.compile, "purifier's training pass", say)

    layers = list(purifier.spec.layers)
    eps_scale = config_eps_scale(cfg)
    tr.attack_strengths(cfg.attacks, eps_scale)  # fail early on a malformed preset
    plans: dict[int, tr.BalancedPlan] = {}  # global batch size → plan (a kept last batch is smaller)

    def plan_for(size: int) -> tr.BalancedPlan:
        if size not in plans:
            count = tr.adversarial_count(size, t.adversarial_fraction, t.adversarial_count, t.reference_world_size)
            plans[size] = tr.balanced_batch_plan(size, t.adversarial_fraction, count)
        return plans[size]

    # DDP averages gradients over ranks; "mean": Σ_local / B_global · world = the global batch mean,
    # "sum": Σ_local · world = the global batch sum (the authors' loss × world_size).
    loss_scale = (lambda size: ctx.world_size / size) if t.loss_reduction == "mean" else (lambda size: ctx.world_size)
    fjoint = purifier.spec.fjoint
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    beta = [0.0]

    def start_epoch(epoch: int) -> dict[str, float]:
        lr = tr.lr_at_epoch(t, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        beta[0] = tr.beta_at_epoch(t, epoch)
        return {"beta": beta[0], "lr": lr}

    bounds = Bounds.parse(t.attack_chunk, t.micro_batch)

    def compute(b: tr.Batch) -> torch.Tensor:
        n = b.hi - b.lo

        def footprint() -> tuple[int, int, int]:  # for "auto": static bytes, per attacked, per purified example
            fp = memory.measure(cfg)
            return (
                memory.training_static(fp, n),
                fp.per_example.attack,
                fp.per_example.representation + fp.per_example.purifier,
            )

        def fits() -> dict[str, int]:
            return memory.fitting_options(memory.measure(cfg), torch.cuda.get_device_properties(device).total_memory, n)

        # FGSM and PGD run as two calls (make_balanced_batch): the larger one is what a chunk bounds.
        groups = plan_for(b.global_size).slice(b.lo, b.hi).groups
        attacked = max(int(((groups == 0) | (groups == 2)).sum()), int(((groups == 1) | (groups == 3)).sum()))
        return run_bounded(
            lambda: compute_bounded(b, footprint),
            bounds,
            n,
            device,
            lambda: optimizer.zero_grad(set_to_none=True),
            fits,
            say,
            attacked=attacked,
        )

    def compute_bounded(b: tr.Batch, footprint) -> torch.Tensor:
        x = b.x.to(device, non_blocking=True)
        y = b.y.to(device, non_blocking=True)
        if on_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        n = x.shape[0]
        bounds.resolve(n, device, footprint)
        gen = tr.batch_generator(device, seed, b.epoch, b.index, 2)
        with autocast():
            plan = plan_for(b.global_size)
            x_in = tr.make_balanced_batch(
                attacked_classifier,
                x,
                y,
                plan.slice(b.lo, b.hi),
                cfg.attacks,
                gen,
                global_plan=plan,
                offset=b.lo,
                eps_scale=eps_scale,
                chunk=bounds.attack_chunk,
            )
        noise = torch.randn((b.global_size, fjoint), generator=gen, device=device)[b.lo : b.hi]

        def step(part: slice) -> torch.Tensor:
            with autocast():
                with torch.no_grad():
                    _, representation = forward_with_representation(classifier, layers, x_in[part], keep_graph=False)
                x_hat, mu, logvar = train_pass(x_in[part], representation, noise[part])
            loss = tr.vae_loss(x_hat, x[part], mu, logvar, beta[0])
            (loss.total * loss_scale(b.global_size)).backward()
            return torch.stack([loss.total.detach(), loss.bce.detach(), loss.kl.detach()]).double()

        # Every rank cuts its rows into the same number of micro-batches (SyncBatchNorm, DDP: bounds.pieces).
        sums = tr.accumulate(
            n,
            bounds.micro_batch,
            step,
            step_module.no_sync if ctx.distributed else None,  # type: ignore[arg-type]
            parts=pieces(b.global_size, ctx.world_size, bounds.micro_batch),
        )
        return torch.cat([sums, torch.tensor([float(n)], device=device, dtype=torch.float64)])

    def update() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def display(sums: list[float]) -> dict[str, float]:
        n = max(sums[3], 1.0)
        return {"loss": sums[0] / n, "bce": sums[1] / n, "kl": sums[2] / n}

    def save(position: tr.Position, epoch_sums: list[float] | None) -> None:
        rng = tr.gather_rng(ctx)
        if ctx.is_main:
            tr.save_training_state(
                run_dir / CHECKPOINT,
                kind=KIND,
                position=position,
                model=purifier,
                optimizer=optimizer,
                config_toml=config_to_toml(cfg),
                rng=rng,
                epoch_sums=epoch_sums,
                extra={"seed": seed, "world_size": ctx.world_size, "global_batch": t.batch_size},
            )
        distributed.barrier(ctx)

    metrics = run_dir / ckpt.METRICS_FILE
    if ctx.is_main:
        if resume:
            tr.truncate_metrics(metrics, start.epoch)
        elif metrics.exists():
            metrics.unlink()
    spec = tr.LoopSpec(
        ctx=ctx,
        dataset=dataset,
        global_batch=t.batch_size,
        epochs=t.epochs,
        seed=seed,
        sums=SUMS,
        title=f"purifier ({cfg.name})",
        num_workers=cfg.data.num_workers,
        checkpoint_every=t.checkpoint_every,
        metrics_path=metrics if ctx.is_main else None,
        drop_last=t.drop_last,
    )
    records = tr.run_loop(
        spec,
        tr.LoopHooks(start_epoch, compute, update, display, save),
        start,
        state.epoch_sums if state is not None else None,
        console=console,
    )

    if ctx.is_main:
        # The slow weights are the trained purifier (Lookahead); the bundle drops the input and joint
        # encoders, which inference does not use (section 4.1).
        with optimizer.slow_weights():
            purifier.eval()
            write_run(run_dir, cfg, classifier, purifier, class_names=data.dataset_class_names(cfg, data_root))
        _plot(run_dir)
    distributed.barrier(ctx)
    return PurifierResult(run_dir, start if resume else None, records)


def _started_since(since: float) -> Path | None:
    """The run under ./runs whose checkpoint was written since ``since`` (a relaunched job without --out)."""
    runs = [
        p for p in ckpt.RUNS_ROOT.glob("*") if (p / CHECKPOINT).is_file() and (p / CHECKPOINT).stat().st_mtime >= since
    ]
    return max(runs, key=lambda p: (p / CHECKPOINT).stat().st_mtime) if runs else None


def _plot(run_dir: Path) -> None:
    from carso_cli.commands.plot import plot_metrics

    plot_metrics(run_dir / ckpt.METRICS_FILE, run_dir / CURVES_FILE, title=f"purifier — {run_dir.name}")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def cli(
    ctx: typer.Context,
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="Preset name or .toml (not needed with --resume).")
    ] = None,
    classifier: Annotated[
        Path | None,
        typer.Option(
            "--classifier",
            help=(
                "Classifier weights (.safetensors, .pt, .pth), a published model's name (carso pull --list), or a "
                "source: robustbench:NAME, torchvision:NAME, timm:NAME, python:package.module:factory (imports and "
                "runs that module of yours)."
            ),
        ),
    ] = None,
    classifier_weights: Annotated[
        Path | None,
        typer.Option(
            "--classifier-weights",
            help=(
                "Weights for a torchvision:/timm:/python: --classifier (safetensors, or .pt read with "
                "weights_only=True)."
            ),
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default runs/<preset>-<timestamp>).")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option("--epochs", min=1, help="Epochs (overrides training.epochs; with --resume, extends the run)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Global batch size (split across processes).")
    ] = None,
    gpus: GpusOpt = 1,
    device: DeviceOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out (default: the latest) from its last checkpoint.")
    ] = False,
    data_root: DataRootOpt = Path("data"),
    seed: SeedOpt = 0,
    bf16: Annotated[
        bool | None, typer.Option("--bf16/--no-bf16", help="bfloat16 autocast on CUDA (default: the preset's).")
    ] = None,
    set_: SetOpt = None,
    attack_chunk: AttackChunkOpt = None,
    micro_batch: MicroBatchOpt = None,
    compile_: CompileOpt = None,
) -> None:
    """Train the purifier against a frozen classifier (adversarially-balanced batches, RAdam+Lookahead)."""
    from carso_cli import zoo
    from carso_cli.cli import console, debug_enabled

    set_, classifier = sources.option_sets(set_, classifier, classifier_weights)  # a source sets the architecture
    classifier = zoo.resolve_weights(classifier)  # a path, or a published model's name (carso pull --list)
    set_ = memory_sets(set_, attack_chunk, micro_batch)
    if compile_ is not None:
        set_ = [*(set_ or []), f"training.compile={compile_}"]
    if distributed.should_relaunch(gpus):
        distributed.check_gpus(gpus, device)
        argv = distributed.relaunch_argv(ctx)  # every option as parsed, --no-x included
        started = time.time()
        try:
            raise typer.Exit(distributed.relaunch(gpus, argv, debug=debug_enabled()))
        except distributed.RankDied as died:
            run_dir = out if out is not None else _started_since(started)
            if out is None and run_dir is not None:
                argv += ["--out", str(run_dir)]
            kept = ckpt.intact_checkpoint(run_dir / CHECKPOINT) if run_dir is not None else None
            raise died.resumable(kept and f"{kept} is intact ({run_dir / CHECKPOINT})", argv) from None
    if resume:
        cfg = resume_config(out, set_, epochs)
        if batch_size is not None:
            cfg.training.batch_size = batch_size  # checked against the run's when its checkpoint is read
    else:
        if preset is None:
            raise CarsoError("--preset is required (or --resume to continue a run)")
        cfg = load_preset(preset, set_, **{"training.epochs": epochs, "training.batch_size": batch_size})
    result = run(
        cfg,
        classifier,
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
    last = result.records[-1] if result.records else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "bce", "kl") if k in last)
    console.print(
        f"purifier trained: {result.run / ckpt.PURIFIER_FILE}" + (f" (last epoch: {summary})" if summary else ""),
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    console.print(str(result.run), soft_wrap=True, highlight=False, markup=False)
