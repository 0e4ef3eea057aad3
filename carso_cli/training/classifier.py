"""Train the preset's classifier, clean or with PGD adversarial training: what ``carso train-classifier`` runs.

For when no published robust classifier can be downloaded (the paper uses published weights, section
5.1), and for the paper's clean-vs-adversarial classifier ablation. SGD with momentum and weight decay;
the step is ``classifier_step``, the run around it the same ``session`` as the purifier's.
Files, for ``DIR/NAME.safetensors``: the weights ``NAME.safetensors`` (which ``train-purifier
--classifier`` accepts) and, beside them, ``NAME.state.safetensors`` (full training state, for
``--resume``), ``NAME.config.toml``, ``NAME.metrics.jsonl`` and ``NAME.curves.png``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli import data, distributed
from carso_cli import training as tr
from carso_cli.config import Config
from carso_cli.errors import CarsoError, ConfigError
from carso_cli.models import build_classifier
from carso_cli.training.classifier_step import ClassifierSteps
from carso_cli.training.session import Options, Place, RunFiles, Session, distributed_run, saved_config, seeded

KIND = "classifier"
CLASSIFIER_FORMAT = "carso-classifier"
# Examples over which the BatchNorm statistics are re-estimated at the end of training.
PRECISE_BN_EXAMPLES = 1024


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


def run_files(weights: Path) -> RunFiles:
    """A classifier training's files: beside its weights, one lock per weights file (a folder may hold several)."""
    return RunFiles(
        where=weights,
        folder=weights.parent,
        checkpoint=companion(weights, "state.safetensors"),
        final=weights,
        config=companion(weights, "config.toml"),
        metrics=companion(weights, "metrics.jsonl"),
        taken=f"{weights} (or its training state) already exists: pass --resume to continue, or another --out",
        started_hint=f"was training started with --out {weights}?",
        lock_file=f".{weights.name}.lock",
        prefix=weights.name.removesuffix(".safetensors") + ".",
    )


def resume_config(out: Path, overrides: dict[str, Any] | None = None) -> Config:
    """The config a resumed classifier training continues with (``NAME.config.toml`` + overrides)."""
    path = companion(out, "config.toml")
    return saved_config(path, overrides or {}, f"{path} not found (was training started with --out {out}?)")


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
    evaluate: bool = True,
    device: torch.device | None = None,
    console: Any = None,
    plot: bool = True,
    **options: Any,
) -> ClassifierResult:
    """Train (or resume) the preset's classifier; returns the path of its weights.

    ``cfg.classifier_training.adversarial`` chooses PGD adversarial training or standard training.
    ``evaluate``: report the clean accuracy on the test split at the end (rank 0). ``plot``: draw the
    training curves beside the weights at the end (rank 0; ``carso plot``'s figure). ``options``: ``resume``, ``seed``,
    ``bf16``, ``preset`` (with ``resume``: the ``--preset`` given again, checked to be the run's) and
    ``data_root`` (``session.Options``).
    """
    resume = options.get("resume", False)
    if out is not None and not str(out).endswith(".safetensors"):
        raise ConfigError(f"--out must name a .safetensors file, got {out}")
    if resume and out is None:
        raise CarsoError("--resume needs --out FILE.safetensors (the weights file of the run to continue)")
    ct = cfg.classifier_training
    opts = Options(KIND, ct.epochs, ct.batch_size, **options)
    with distributed_run(device) as (ctx, stack):  # the weights' lock, and the removal of a failed start
        session = Session(cfg, ctx, opts, stack, console)
        weights = Path(distributed.broadcast_object(str(out or default_out(cfg)), ctx))
        files = run_files(weights)
        where = Place(known=files, resumed=lambda: files, new=lambda: (files, not weights.parent.exists()))
        return _train(session, where, evaluate, plot)


def _train(session: Session, where: Place, evaluate: bool, plot: bool) -> ClassifierResult:
    cfg, ctx, ct, data_root = session.cfg, session.ctx, session.cfg.classifier_training, session.opts.data_root
    done = session.begin(where)
    if done is not None:
        return ClassifierResult(session.run, None, [], float("nan"), complete=done)
    # The data is checked before anything is written (issue 7: a failed start leaves nothing).
    dataset = session.load_data(where)

    with seeded(session.seed, 13):
        model = build_classifier(cfg).to(session.device)
    model = session.sync_batchnorm(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=ct.lr, momentum=ct.momentum, weight_decay=ct.weight_decay)
    session.restore(model, optimizer)
    session.channels_last(model)
    steps = ClassifierSteps(session, model, optimizer, len(dataset) // ct.batch_size)  # type: ignore[arg-type]
    kind = "PGD adversarial" if steps.adversarial else "standard"
    records = session.loop(dataset, model, optimizer, steps, title=f"classifier, {kind} ({cfg.name})")

    assert session.spec is not None
    recalibrate_bn(model, session.spec, lambda b: steps.make_input(b)[0], ct.epochs)
    accuracy = float("nan")
    weights = session.run
    if ctx.is_main:
        model.eval()
        if evaluate:
            test = data.build_dataset(cfg, "test", root=data_root, download=True, augment=False)
            accuracy = clean_accuracy(model, test, session.device)
        meta = {
            "format": CLASSIFIER_FORMAT,
            "preset": cfg.name,
            "adversarial": ct.adversarial,
            "epochs": str(ct.epochs),
            "eps": repr(cfg.attacks.eps),
            "clean_accuracy": repr(accuracy),
        }
        ckpt.save_tensors(weights, model.state_dict(), meta)
        if plot:
            from carso_cli.plotting import plot_metrics

            plot_metrics(session.run_files.metrics, companion(weights, "curves.png"), f"classifier — {weights.name}")
    distributed.barrier(ctx)
    return ClassifierResult(weights, session.resumed_from, records, accuracy)
