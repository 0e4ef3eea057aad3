"""Train the purifier against a frozen classifier (sections 4.4 and 5.1): what ``carso train-purifier`` runs.

RAdam inside Lookahead with the per-epoch LR schedule of Table 16; the step is ``purifier_step``, the
run around it (lock, resume, data, devices, DDP, checkpoints, metrics) the shared ``session``. Runs in
one process or under torchrun (DDP + SyncBatchNorm, the preset's batch being the global one); every
random draw depends on (seed, epoch, batch) only, so N processes compute what one does and a resumed
run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli import data, distributed
from carso_cli import training as tr
from carso_cli.config import Config
from carso_cli.errors import CarsoError, CheckpointError
from carso_cli.models import Purifier, build_purifier, set_eval_frozen, sources, write_run
from carso_cli.training.compiled import check_backend
from carso_cli.training.purifier_step import PurifierSteps
from carso_cli.training.session import Options, Place, RunFiles, Session, distributed_run, saved_config, seeded

CHECKPOINT = Path("checkpoints") / "last.safetensors"
CURVES_FILE = "curves.png"
KIND = "purifier"


@dataclasses.dataclass
class PurifierResult:
    run: Path
    resumed_from: tr.Position | None
    records: list[dict[str, Any]]
    complete: str | None = None  # --resume of a finished run: the line that says so (nothing was done)


def run_files(run: Path) -> RunFiles:
    """A purifier training's files: its run directory."""
    return RunFiles(
        where=run,
        folder=run,
        checkpoint=run / CHECKPOINT,
        final=run / ckpt.PURIFIER_FILE,
        config=run / ckpt.CONFIG_FILE,
        metrics=run / ckpt.METRICS_FILE,
        taken=f"{run} already holds a training run: pass --resume to continue it, or another --out",
        started_hint="was this run started?",
    )


def place(cfg: Config, out: Path | None) -> Place:
    """``out``, or a new ``runs/<preset>-<timestamp>`` (made on rank 0) / the latest run (``--resume``)."""

    def new() -> tuple[RunFiles, bool]:
        if out is None:
            return run_files(ckpt.new_run_dir(cfg.name)), True
        return run_files(Path(out)), not Path(out).exists()

    return Place(
        known=run_files(Path(out)) if out is not None else None,
        resumed=lambda: run_files(Path(out) if out is not None else ckpt.latest_run(require=str(CHECKPOINT))),
        new=new,
    )


def resume_config(run: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """The config a resumed run continues with: its ``config.toml`` plus ``overrides`` (``--set`` …)."""
    run = run if run is not None else ckpt.latest_run(require=str(CHECKPOINT))
    return saved_config(run / ckpt.CONFIG_FILE, overrides or {}, f"{run} has no {ckpt.CONFIG_FILE}")


def check_classifier_option(cfg: Config, classifier: Path | None) -> None:
    """A new run's ``--classifier``: required unless the source brings its weights; a file that exists."""
    if classifier is None and sources.needs_weights_file(cfg):
        arch = cfg.classifier.architecture
        hint = "" if arch == "wideresnet" else f" ({arch}: --classifier-weights FILE)"
        raise CarsoError(
            "--classifier is required: the weights of the preset's (adversarially-trained) classifier" + hint
        )
    if classifier is not None and not Path(classifier).is_file():
        raise CheckpointError(f"--classifier: file not found: {classifier}")


def run(
    cfg: Config,
    classifier: Path | None,
    out: Path | None = None,
    *,
    device: torch.device | None = None,
    console: Any = None,
    plot: bool = True,
    **options: Any,
) -> PurifierResult:
    """Train (or resume) a purifier; returns the run directory with ``purifier.safetensors`` in it.

    Args:
        cfg: the preset (for ``resume``, ``resume_config(run)``).
        classifier: weights of the preset's classifier (``.safetensors``/``.pt``; None for a ``robustbench:``
            source, loaded through RobustBench, or a ``python:`` factory that returns trained weights);
            when resuming, only compared with the run's (which keeps its own copy).
        out: run directory (default ``runs/<preset>-<timestamp>``; with ``resume``, the latest run).
        device: default cuda when available (under torchrun: this rank's GPU).
        plot: draw ``curves.png`` from the metrics at the end (rank 0; ``carso plot``'s figure).
        options: ``resume``, ``seed``, ``bf16``, ``preset``, ``data_root`` (``session.Options``).
    """
    check_backend(cfg.training.compile)  # before anything is written
    opts = Options(KIND, cfg.training.epochs, cfg.training.batch_size, **options)
    with distributed_run(device) as (ctx, stack):  # the run's lock, and the removal of a failed start
        session = Session(cfg, ctx, opts, stack, console)
        return _train(session, classifier, place(cfg, out), plot)


def _load_classifier(session: Session, classifier_path: Path | None) -> tuple[nn.Module, Any]:
    """The frozen classifier: a new run's from its source, a resumed run's own copy (compared with
    ``--classifier`` if given). Returns it and, for a new run, what ``sources.load`` loaded."""
    cfg, device = session.cfg, session.device
    if not session.opts.resume:
        loaded = sources.load(cfg, classifier_path, device)  # any source (models/sources.py)
        classifier = loaded.model
    else:
        run, loaded = session.run, None
        if classifier_path is not None and not ckpt.same_classifier(classifier_path, run):
            raise CheckpointError(f"--classifier {classifier_path} differs from the classifier of {run}")
        classifier = sources.load_saved(ckpt.classifier_path_of(run), cfg, device)
    set_eval_frozen(classifier)
    return classifier, loaded


def _build(session: Session, classifier: nn.Module) -> tuple[Purifier, tr.Lookahead]:
    """The purifier (the same initial weights on every rank) and RAdam inside Lookahead (Table 16)."""
    t = session.cfg.training
    with seeded(session.seed, 11):
        purifier = build_purifier(session.cfg, classifier).to(session.device)
    purifier = session.sync_batchnorm(purifier)  # type: ignore[assignment]
    radam = torch.optim.RAdam(
        purifier.parameters(),
        lr=tr.lr_at_epoch(t, 0),
        betas=(t.radam_beta1, t.radam_beta2),
        eps=t.radam_eps,
        weight_decay=t.weight_decay,
    )
    return purifier, tr.Lookahead(radam, k=t.lookahead_k, alpha=t.lookahead_alpha)


def _train(session: Session, classifier_path: Path | None, where: Place, plot: bool) -> PurifierResult:
    cfg, ctx, data_root = session.cfg, session.ctx, session.opts.data_root
    if not session.opts.resume:
        check_classifier_option(cfg, classifier_path)
    done = session.begin(where)
    if done is not None:
        return PurifierResult(session.run, None, [], complete=done)
    # Inputs are checked (classifier weights, data) before a new run directory is made (issue 7).
    classifier, loaded = _load_classifier(session, classifier_path)
    dataset = session.load_data(where)
    run_dir = session.run
    if ctx.is_main and loaded is not None:
        record = sources.record(run_dir, loaded)  # the source, the weights' sha256 (for --resume --classifier)
        sources.save(run_dir / ckpt.CLASSIFIER_FILE, classifier, cfg, record.get("sha256"))

    purifier, optimizer = _build(session, classifier)
    session.restore(purifier, optimizer)
    session.channels_last(classifier, purifier)
    steps = PurifierSteps(session, classifier, purifier, optimizer)
    records = session.loop(
        dataset, purifier, optimizer, steps, title=f"purifier ({cfg.name})", drop_last=cfg.training.drop_last
    )
    if ctx.is_main:
        # The slow weights are the trained purifier (Lookahead); the bundle drops the input and joint
        # encoders, which inference does not use (section 4.1).
        with optimizer.slow_weights():
            purifier.eval()
            write_run(run_dir, cfg, classifier, purifier, class_names=data.dataset_class_names(cfg, data_root))
        if plot:
            from carso_cli.plotting import plot_metrics

            plot_metrics(run_dir / ckpt.METRICS_FILE, run_dir / CURVES_FILE, f"purifier — {run_dir.name}")
    distributed.barrier(ctx)
    return PurifierResult(run_dir, session.resumed_from, records)
