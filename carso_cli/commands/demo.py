"""``carso demo``: the whole pipeline on the embedded default, end to end, in a few CPU minutes.

1. ``train-classifier``: PGD adversarial training of the smoke preset's tiny WideResNet (synthetic data);
2. ``train-purifier``: the purifier on adversarially-balanced batches against that classifier;
3. ``eval --attack adaptive``: standard AutoAttack on the classifier; on CARSO the paper's randomized
   AutoAttack and the adaptive worst case (C/adaptive) with the attack-failure indicators, printed in the
   columns of the paper's Table 2.

Every step is the real subcommand's library function: the demo only chains them, with the evaluation's
sizes (``DemoSizes``) chosen for about five minutes on 2 CPU cores (BENCHMARKS.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.markup import escape
from rich.panel import Panel

from carso_cli import checkpoint as ckpt
from carso_cli import locking
from carso_cli.commands._common import load_preset, resolve_device
from carso_cli.commands._options import DataRootOpt, DeviceOpt, PresetOpt, SeedOpt, SetOpt
from carso_cli.config import Config


@dataclass(frozen=True)
class DemoSizes:
    """The evaluation's sizes: the adaptive evaluation in full, shrunk to ~5 CPU minutes with training."""

    n_examples: int = 32  # the first test examples
    batch_size: int = 32
    steps: int = 10  # every attack's steps (the paper: 100)
    eot: int = 2  # EoT iterations (the smoke preset's)
    repeats: int = 2  # re-classifications of each clean and adversarial example (the default: 10)
    queries: int = 100  # Square's queries in the classifier's standard AutoAttack (the default: 5000)
    indicator_examples: int = 8  # the attack-failure indicators on the first 8 (the default; ~1 s here)

    def describe(self, cfg: Config) -> str:
        return (
            f"training: classifier {cfg.classifier_training.epochs} epochs, purifier {cfg.training.epochs} "
            f"epochs on {cfg.data.synthetic_train_size if cfg.data.dataset == 'synthetic' else 'all'} "
            f"{cfg.data.dataset} images; evaluation (--attack adaptive): {self.n_examples} examples, "
            f"{self.steps} steps, EoT {self.eot}, {self.repeats} repeats, Square {self.queries} queries, "
            f"indicators on {self.indicator_examples} examples"
        )


@dataclass
class DemoResult:
    run: Path
    classifier: Path
    results: dict[str, Any] | None
    seconds: dict[str, float]


def run(
    cfg: Config,
    out: Path | None = None,
    *,
    sizes: DemoSizes = DemoSizes(),
    device: str | None = None,
    seed: int = 0,
    data_root: Path = Path("data"),
    console: Any = None,
) -> DemoResult:
    """Train a classifier and a purifier, then evaluate both; returns the run and its results."""
    dev = resolve_device(device)
    run_dir = Path(out) if out is not None else ckpt.new_run_dir(f"demo-{cfg.name}")
    made = out is None or not run_dir.exists()
    # The run's lock for the whole pipeline (the steps below take it again, in this process); a demo
    # that fails before its first checkpoint leaves nothing.
    with (
        locking.hold(run_dir),
        ckpt.undo_on_failure(
            run_dir, made, keep=[run_dir / "adversarial-classifier.state.safetensors", run_dir / "checkpoints"]
        ),
    ):
        return _pipeline(cfg, run_dir, dev, sizes, seed, data_root, console)


def _pipeline(
    cfg: Config, run_dir: Path, dev: torch.device, sizes: DemoSizes, seed: int, data_root: Path, console: Any
) -> DemoResult:
    from carso_cli import evaluation as ev
    from carso_cli.training import classifier as classifier_training
    from carso_cli.training import purifier as purifier_training

    seconds: dict[str, float] = {}
    if console is not None:
        console.print(f"[bold]carso demo[/] — {escape(sizes.describe(cfg))}", highlight=False)

    def step(title: str) -> None:
        if console is not None:
            console.rule(f"[bold]{title}")

    step("1/3  carso train-classifier  (PGD adversarial training)")
    t0 = time.perf_counter()
    classifier = classifier_training.run(
        cfg,
        run_dir / "adversarial-classifier.safetensors",
        device=dev,
        data_root=data_root,
        seed=seed,
        console=console,
    ).weights
    seconds["train-classifier"] = time.perf_counter() - t0

    step("2/3  carso train-purifier  (adversarially-balanced batches)")
    t0 = time.perf_counter()
    purifier_training.run(cfg, classifier, run_dir, device=dev, data_root=data_root, seed=seed, console=console)
    seconds["train-purifier"] = time.perf_counter() - t0

    step(f"3/3  carso eval --attack adaptive  ({sizes.n_examples} examples)")
    t0 = time.perf_counter()
    settings = ev.EvalSettings.from_options(
        ev.run_config(run_dir),
        attack="adaptive",
        n_examples=sizes.n_examples,
        batch_size=sizes.batch_size,
        aa_steps=sizes.steps,
        pgd_steps=sizes.steps,
        aa_eot=sizes.eot,
        pgd_eot=sizes.eot,
        repeats=sizes.repeats,
        square_queries=sizes.queries,
        indicator_examples=sizes.indicator_examples,
        seed=seed,
    )
    outcome = ev.run_evaluation(ev.EvalJob(run_dir, settings, dev, name="demo", data_root=data_root), console)
    seconds["eval"] = time.perf_counter() - t0
    return DemoResult(run_dir, Path(classifier), outcome.results, seconds)


def closing_panel() -> Panel:
    """Three lines (at 80 columns too): what the table's numbers mean, and the next commands (a real model)."""
    lines = [
        "AT: classifier, C: CARSO · Cl: clean, AA: attacked · [bold]C/adaptive[/]: worst case",
        "Tiny model, synthetic data: the pipeline, not the paper (--preset cifar10).",
        "Next: [bold]carso pull cifar10-cui2023 && carso eval --run runs/cifar10-cui2023[/]",
    ]
    return Panel("\n".join(lines), title="what this means", expand=True)


def cli(
    preset: PresetOpt = "smoke",
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default runs/demo-<preset>-<time>).")
    ] = None,
    n_examples: Annotated[
        int, typer.Option("--n-examples", min=1, help="Test examples to evaluate.")
    ] = DemoSizes.n_examples,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    data_root: DataRootOpt = Path("data"),
) -> None:
    """Run the whole pipeline on the embedded default: train-classifier, train-purifier, eval."""
    from carso_cli.cli import console

    cfg = load_preset(preset, set_)
    sizes = DemoSizes(**{**asdict(DemoSizes()), "n_examples": n_examples})
    result = run(cfg, out, sizes=sizes, device=device, seed=seed, data_root=data_root, console=console)
    console.rule("[bold]summary")  # the Table 2 summary is just above (printed by eval)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    console.print(f"run directory: [bold]{escape(str(result.run))}[/]  ({timing})")
    console.print(closing_panel())
