"""``carso demo``: the whole pipeline on the embedded default, end to end, in a few CPU minutes.

1. ``train-classifier``: PGD adversarial training of the smoke preset's tiny WideResNet (synthetic data);
2. ``train-purifier``: the purifier on adversarially-balanced batches against that classifier;
3. ``eval``: standard AutoAttack on the classifier and randomized AutoAttack end-to-end on CARSO, on
   the first few hundred test examples, printed in the columns of the paper's Table 2.

Every step is the real subcommand's library function: the demo only chains them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.markup import escape

from carso_cli import checkpoint as ckpt
from carso_cli import locking
from carso_cli.commands._common import DataRootOpt, DeviceOpt, PresetOpt, SeedOpt, SetOpt, load_preset, resolve_device
from carso_cli.config import Config


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
    n_examples: int = 200,
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
    with locking.hold(run_dir), ckpt.undo_on_failure(
        run_dir, made, keep=[run_dir / "adversarial-classifier.state.safetensors", run_dir / "checkpoints"]
    ):
        return _pipeline(cfg, run_dir, dev, n_examples, seed, data_root, console)


def _pipeline(cfg: Config, run_dir: Path, dev: torch.device, n_examples: int, seed: int, data_root: Path,
              console: Any) -> DemoResult:
    from carso_cli.commands import evaluate, train_classifier, train_purifier

    seconds: dict[str, float] = {}

    def step(title: str) -> None:
        if console is not None:
            console.rule(f"[bold]{title}")

    step("1/3  carso train-classifier  (PGD adversarial training)")
    t0 = time.perf_counter()
    classifier = train_classifier.run(
        cfg, run_dir / "adversarial-classifier.safetensors", device=dev, data_root=data_root, seed=seed,
        console=console,
    ).weights
    seconds["train-classifier"] = time.perf_counter() - t0

    step("2/3  carso train-purifier  (adversarially-balanced batches)")
    t0 = time.perf_counter()
    train_purifier.run(cfg, classifier, run_dir, device=dev, data_root=data_root, seed=seed, console=console)
    seconds["train-purifier"] = time.perf_counter() - t0

    step(f"3/3  carso eval  (AutoAttack on the classifier, randomized AutoAttack on CARSO; {n_examples} examples)")
    t0 = time.perf_counter()
    outcome = evaluate.run(
        run_dir, attack="autoattack", target="both", n_examples=n_examples, device=str(dev), seed=seed,
        data_root=data_root, console=console, name="demo",
    )
    seconds["eval"] = time.perf_counter() - t0
    return DemoResult(run_dir, Path(classifier), outcome.results, seconds)


def cli(
    preset: PresetOpt = "smoke",
    set_: SetOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/demo-<preset>-<time>).")] = None,
    n_examples: Annotated[int, typer.Option("--n-examples", min=1, help="Test examples to evaluate.")] = 200,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    data_root: DataRootOpt = Path("data"),
) -> None:
    """Run the whole pipeline on the embedded default: train-classifier, train-purifier, eval."""
    from carso_cli.cli import console

    cfg = load_preset(preset, set_)
    result = run(cfg, out, n_examples=n_examples, device=device, seed=seed, data_root=data_root, console=console)
    console.rule("[bold]summary")  # the Table 2 summary is just above (printed by eval)
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    console.print(f"run directory: [bold]{escape(str(result.run))}[/]  ({timing})")
    console.print(
        f"next: carso predict IMAGE --run {result.run}   ·   carso sanity --run {result.run}   ·   "
        f"carso plot {result.run}", markup=False,
    )
