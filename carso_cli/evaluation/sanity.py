"""``carso sanity`` as a library call: the checks of ``checks`` on a run directory, with a JSON report."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from carso_cli import checkpoint as ckpt
from carso_cli.evaluation.autoattack import library_logging
from carso_cli.evaluation.batch import load_examples
from carso_cli.evaluation.checks import Batches, CheckInputs, CheckResult, SanitySettings, run_checks
from carso_cli.evaluation.report import library_versions
from carso_cli.evaluation.settings import batch_ranges
from carso_cli.evaluation.store import dumps_compact
from carso_cli.progress import progress_bar

SANITY_FORMAT = "carso-sanity/1"
SANITY_LOG = "sanity-autoattack.log"  # AutoAttack's own lines: off the terminal, as in eval


@dataclass
class SanityReport:
    run: Path
    settings: SanitySettings
    checks: list[CheckResult]
    wall_time_s: float
    path: Path | None = None

    @property
    def passed(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SANITY_FORMAT,
            "run": str(self.run),
            "passed": self.passed,
            "settings": asdict(self.settings),
            "checks": [asdict(c) for c in self.checks],
            "wall_time_s": round(self.wall_time_s, 3),
            "versions": library_versions(),
        }


def run_sanity(
    run_dir: Path | None,
    settings: SanitySettings,
    *,
    device: torch.device,
    data_root: Path = Path("data"),
    out: Path | None = None,
    console: Any = None,
) -> SanityReport:
    """Run the selected checks on a run directory; writes the JSON report (default RUN/sanity.json).

    ``console`` (a rich Console, or None: silent) gets the header, a progress display and the table.
    """
    from carso_cli.data import build_dataset
    from carso_cli.evaluation.render import render_sanity
    from carso_cli.models import load_run

    started = time.time()
    loaded = load_run(run_dir, device)
    s = settings
    s.validate()
    dataset = build_dataset(loaded.cfg, "test", root=str(data_root))
    s.n_examples = min(s.n_examples or len(dataset), len(dataset))
    carso = loaded.carso(samples=s.samples, aggregation=s.aggregation)
    classifier = loaded.classifier
    for p in classifier.parameters():
        p.requires_grad_(False)
    classifier.eval()
    batches: Batches = []
    for rng in batch_ranges(s.n_examples, s.batch_size):
        x, y = load_examples(dataset, rng)
        batches.append((x.to(device), y.to(device), rng))
    if console is not None:
        console.print(
            f"[bold]carso sanity[/] {escape(str(loaded.run))} — {s.n_examples} examples, {s.samples} samples, "
            f"{s.aggregation} aggregation, checks: {', '.join(s.checks)}",
            highlight=False,
        )
    inputs = CheckInputs(carso, classifier, batches, s, loaded.cfg.data.num_classes, device, run=loaded.run)
    log_path = loaded.run / SANITY_LOG
    with library_logging(console, log_path=log_path) as log_counts:
        results = _with_progress(inputs, console)
    report = SanityReport(loaded.run, s, results, time.time() - started)
    report.path = Path(out) if out is not None else loaded.run / "sanity.json"
    ckpt.atomic_write_text(report.path, dumps_compact(report.to_json()))
    if console is not None:
        render_sanity(report, console)
        if log_counts["lines"]:
            console.print(
                f"[dim]AutoAttack's log: {log_counts['lines']} lines ({log_counts['warnings']} warnings, "
                f"shown above) in {escape(str(log_path))}[/]",
                highlight=False,
            )
    return report


def _with_progress(inputs: CheckInputs, console: Any) -> list[CheckResult]:
    """``run_checks`` with an open-ended progress counter on ``console`` (none without one)."""
    if console is None:
        return run_checks(inputs, inputs.s.checks)
    progress = progress_bar(console)
    with progress:
        task = progress.add_task("sanity", total=None)
        inputs.tick = lambda label: progress.update(task, description=label, advance=1)
        return run_checks(inputs, inputs.s.checks)
