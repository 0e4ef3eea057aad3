"""``carso sanity``: the checks an honest robustness claim needs, as a pass/fail checklist.

1. **large-eps** — CARSO under the randomized AutoAttack at ε = 0.95 must be at most chance (1/C)
   plus a tolerance (the paper's Table 3): otherwise the attack is not working, not the defence.
2. **gradients** — input gradients of randAA's losses (CE and DLR) over examples and stochastic draws:
   the fraction of entries that are zero or non-finite, and of gradients that are useless for a sign
   step (entirely zero, or with a non-finite entry). Majority-vote aggregation fails here (the later
   version's Table 5: > 99 % of its gradients are zero or NaN); the paper's aggregation passes.
3. **monotonic** — robust accuracy under short PGD+EoT does not rise with ε beyond noise.
4. **eot** — agreement (cosine) of two independent EoT gradient estimates; a warning when low.
5. **blackbox** — neither the Square attack nor a transfer attack (PGD against the classifier alone, fed
   to CARSO) is markedly stronger than the end-to-end white-box attack (the same PGD+EoT budget):
   if one were, the white-box gradients would be masked.
6. **saturation** — the fraction of examples whose cross-entropy input gradient is numerically useless
   (zero, non-finite, or not the direction of its float64 recomputation; ``evaluation.saturation``)
   on the paper's ``dexp`` surface and on ``dexp-logsum`` (the same decision): fails when the
   paper's surface is saturated above the threshold while ``dexp-logsum`` is not — cross-entropy attacks
   on the paper's surface are then blunted, and ``carso eval --attack adaptive`` is the remedy.
7. **indicators** — the attack-failure indicators (Pintor et al. 2022) that ``carso eval --attack adaptive``
   stored for this run (``RUN/eval/NAME/results.json``, ``--eval NAME``): fails when one failed; a warning
   when there is no such evaluation, or it was made with other weights.

Every stochastic draw is seeded per example (``evaluation.ExampleSeededSampler``).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from carso_cli import checkpoint as ckpt
from carso_cli import evaluation as ev
from carso_cli.aggregation import AGGREGATIONS
from carso_cli.commands._common import (
    AGGREGATION_HELP,
    Aggregation,
    DataRootOpt,
    DeviceOpt,
    RunOpt,
    SeedOpt,
    resolve_device,
)
from carso_cli.config import parse_eps
from carso_cli.errors import CarsoError

CHECKS = ("large-eps", "gradients", "monotonic", "eot", "blackbox", "saturation", "indicators")
SANITY_FORMAT = "carso-sanity/1"


@dataclass
class SanitySettings:
    """What the checks run with; thresholds included (all stored in the JSON report)."""

    checks: list[str] = field(default_factory=lambda: list(CHECKS))
    n_examples: int = 256
    batch_size: int = 64
    samples: int = 8
    aggregation: str = "dexp"
    seed: int = 0
    # 1. large ε: randAA at ε = 0.95 (Table 3), APGD steps and EoT iterations.
    large_eps: float = 0.95
    aa_steps: int = 20
    aa_eot: int = 20
    chance_tolerance: float = 0.05
    # 2. gradient health.
    draws: int = 4
    max_bad_entries: float = 0.5
    max_bad_gradients: float = 0.1
    # 3./5. short PGD+EoT (the white-box reference) and its ε sweep.
    eps: float = 8 / 255
    eps_list: list[float] = field(default_factory=lambda: [2 / 255, 4 / 255, 8 / 255, 16 / 255])
    steps: int = 20
    step_size: float = 0.007
    eot: int = 5
    monotonic_tolerance: float = 0.05
    # 4. EoT stability.
    min_eot_cosine: float = 0.5
    # 5. black-box attacks.
    queries: int = 1000
    blackbox_tolerance: float = 0.05
    # 6. gradient saturation of the paper's surface.
    saturation_threshold: float = 0.1
    # 7. the attack-failure indicators of this evaluation (RUN/eval/NAME).
    eval_name: str = "adaptive"


@dataclass
class CheckResult:
    key: str
    title: str
    status: str  # "pass", "fail", "warn"
    measured: str
    threshold: str
    details: dict[str, Any] = field(default_factory=dict)


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
            "versions": ev.library_versions(),
        }


def noise(p: float, q: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies p, q measured on n examples each."""
    return 2.0 * math.sqrt(max(p * (1 - p) + q * (1 - q), 0.0) / max(n, 1))


def parse_checks(text: str | None) -> list[str]:
    if text is None or text.strip() in ("", "all"):
        return list(CHECKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in CHECKS:
            raise CarsoError(f"unknown check '{name}' (choose from {', '.join(CHECKS)}, or 'all')")
    return names


def parse_eps_list(text: str) -> list[float]:
    values = [parse_eps(t.strip(), "--eps-list") for t in text.split(",") if t.strip()]
    if len(values) < 2 or any(b <= a for a, b in itertools.pairwise(values)):
        raise CarsoError("--eps-list needs at least two increasing values, e.g. 2/255,4/255,8/255,16/255")
    return values


Batches = list[tuple[torch.Tensor, torch.Tensor, range]]


class Checker:
    """Runs the checks on one CARSO model and its classifier over fixed batches of examples."""

    def __init__(
        self,
        carso: torch.nn.Module,
        classifier: torch.nn.Module,
        batches: Batches,
        s: SanitySettings,
        num_classes: int,
        device: torch.device,
        tick: Callable[[str], None] | None = None,
        run: Path | None = None,
    ) -> None:
        self.run = run
        self.carso = carso
        self.classifier = classifier
        self.batches = batches
        self.s = s
        self.num_classes = num_classes
        self.device = device
        self.n = sum(len(idx) for _, _, idx in batches)
        self.tick = tick or (lambda _label: None)
        self._clean: list[torch.Tensor] | None = None
        self._pgd: dict[float, float] = {}

    # shared pieces ---------------------------------------------------------------------------------

    def clean(self) -> list[torch.Tensor]:
        """CARSO's single-draw clean correctness per batch (robust flags are ANDed with it)."""
        if self._clean is None:
            self._clean = [
                ev.draw_flags(self.carso, x, y, idx, self.s.seed, ev.STREAM_CLEAN)[0] for x, y, idx in self.batches
            ]
        return self._clean

    def pgd_accuracy(self, eps: float) -> float:
        """Robust accuracy of CARSO under short PGD+EoT at ``eps`` (single seeded draw)."""
        if eps not in self._pgd:
            correct = 0
            for (x, y, idx), clean in zip(self.batches, self.clean()):
                x_adv = ev.pgd_eot_examples(
                    self.carso,
                    x,
                    y,
                    idx,
                    eps=eps,
                    steps=self.s.steps,
                    step_size=self.s.step_size,
                    eot=self.s.eot,
                    seed=self.s.seed,
                )
                flags = ev.draw_flags(self.carso, x_adv, y, idx, self.s.seed, ev.STREAM_ADV)[0] & clean
                correct += int(flags.sum())
                self.tick(f"PGD+EoT ε={eps:.4f}")
            self._pgd[eps] = correct / self.n
        return self._pgd[eps]

    # the five checks -------------------------------------------------------------------------------

    def large_eps(self) -> CheckResult:
        s = self.s
        correct = 0
        warnings: list[str] = []
        for _k, ((x, y, idx), clean) in enumerate(zip(self.batches, self.clean())):
            res = ev.autoattack_flags(
                self.carso,
                x,
                y,
                eps=s.large_eps,
                version="rand",
                seed=ev.example_seed(s.seed, "sanity", idx[0], bits=31),
                device=self.device,
                steps=s.aa_steps,
                eot=s.aa_eot,
            )
            correct += int((res.flags & clean).sum())
            warnings += res.warnings
            self.tick("randAA at large ε")
        acc = correct / self.n
        limit = 1.0 / self.num_classes + s.chance_tolerance
        return CheckResult(
            "large-eps",
            f"randAA at ε = {s.large_eps:g} ≤ chance",
            "pass" if acc <= limit else "fail",
            f"{100 * acc:.2f}%",
            f"≤ {100 * limit:.2f}%",
            {
                "accuracy": acc,
                "correct": correct,
                "total": self.n,
                "chance": 1.0 / self.num_classes,
                "limit": limit,
                "library_warnings": sorted(set(warnings)),
            },
        )

    def gradients(self) -> CheckResult:
        s = self.s
        stats = {loss: ev.GradientStats() for loss in ev.LOSSES}
        for x, y, idx in self.batches:
            for loss in ev.LOSSES:
                stats[loss] = stats[loss] + ev.gradient_health(
                    self.carso, x, y, idx, draws=s.draws, seed=s.seed, loss=loss
                )
            self.tick("gradient health")
        healthy = {
            loss: st.bad_entry_fraction <= s.max_bad_entries and st.bad_gradient_fraction <= s.max_bad_gradients
            for loss, st in stats.items()
        }
        # An attack with one healthy loss still works (randAA runs both): fail only when none is;
        # warn when one is masked (e.g. CE saturating on very confident scores).
        status = "pass" if all(healthy.values()) else "warn" if any(healthy.values()) else "fail"
        measured = ", ".join(
            f"{loss.upper()} {100 * st.bad_entry_fraction:.1f}% / {100 * st.bad_gradient_fraction:.1f}%"
            for loss, st in stats.items()
        )
        return CheckResult(
            "gradients",
            "gradient health",
            status,
            measured,
            f"≤ {100 * s.max_bad_entries:.0f}% entries / ≤ {100 * s.max_bad_gradients:.0f}% grads",
            {loss: {**st.to_json(), "healthy": healthy[loss]} for loss, st in stats.items()},
        )

    def monotonic(self) -> CheckResult:
        s = self.s
        accs = [self.pgd_accuracy(e) for e in s.eps_list]
        rises = []
        for (e0, a0), (e1, a1) in itertools.pairwise(zip(s.eps_list, accs)):
            allowed = s.monotonic_tolerance + noise(a0, a1, self.n)
            if a1 - a0 > allowed:
                rises.append({"from_eps": e0, "to_eps": e1, "rise": a1 - a0, "allowed": allowed})
        measured = " → ".join(f"{100 * a:.1f}%" for a in accs)
        return CheckResult(
            "monotonic",
            "ε-monotonicity (PGD+EoT)",
            "fail" if rises else "pass",
            measured,
            f"rise ≤ {100 * s.monotonic_tolerance:.0f}% + noise",
            {"eps": s.eps_list, "accuracy": accs, "rises": rises, "steps": s.steps, "eot": s.eot},
        )

    def eot(self) -> CheckResult:
        s = self.s
        cos: dict[str, list[torch.Tensor]] = {loss: [] for loss in ev.LOSSES}
        for x, y, idx in self.batches:
            for loss in ev.LOSSES:
                cos[loss].append(ev.eot_agreement(self.carso, x, y, idx, eot=s.eot, seed=s.seed, loss=loss))
            self.tick("EoT stability")
        means = {loss: float(torch.cat(v).mean()) for loss, v in cos.items()}
        low = [loss for loss, m in means.items() if m < s.min_eot_cosine]
        return CheckResult(
            "eot",
            "EoT stability (cosine)",
            "warn" if low else "pass",
            ", ".join(f"{loss.upper()} {m:.3f}" for loss, m in means.items()),
            f"≥ {s.min_eot_cosine:g} (warning only)",
            {
                "mean_cosine": means,
                "min_cosine": {k: float(torch.cat(v).min()) for k, v in cos.items()},
                "low": low,
                "hint": "raise --eot (EoT iterations) if low" if low else "",
            },
        )

    def blackbox(self) -> CheckResult:
        from carso_cli.attacks import pgd

        s = self.s
        white = self.pgd_accuracy(s.eps)
        square = transfer = 0
        warnings: list[str] = []
        for (x, y, idx), clean in zip(self.batches, self.clean()):
            res = ev.autoattack_flags(
                self.carso,
                x,
                y,
                eps=s.eps,
                version="custom",
                attacks=["square"],
                seed=ev.example_seed(s.seed, "square", idx[0], bits=31),
                device=self.device,
                square_queries=s.queries,
            )
            square += int((res.flags & clean).sum())
            warnings += res.warnings
            # Transfer: the same PGD budget against the classifier alone, then fed to CARSO.
            gen = torch.Generator().manual_seed(ev.example_seed(s.seed, "transfer", idx[0], bits=31))
            x_t = pgd(self.classifier, x, y, s.eps, s.steps, s.step_size, random_start=True, generator=gen)
            transfer += int((ev.draw_flags(self.carso, x_t, y, idx, s.seed, ev.STREAM_ADV)[0] & clean).sum())
            self.tick("black-box attacks")
        acc_sq, acc_tr = square / self.n, transfer / self.n
        stronger = []
        for name, acc in (("square", acc_sq), ("transfer", acc_tr)):
            allowed = s.blackbox_tolerance + noise(white, acc, self.n)
            if white - acc > allowed:
                stronger.append({"attack": name, "accuracy": acc, "white_box": white, "allowed": allowed})
        return CheckResult(
            "blackbox",
            "white-box vs black-box",
            "fail" if stronger else "pass",
            f"white {100 * white:.1f}%, square {100 * acc_sq:.1f}%, transfer {100 * acc_tr:.1f}%",
            f"≥ white − {100 * s.blackbox_tolerance:.0f}% − noise",
            {
                "white_box": white,
                "square": acc_sq,
                "transfer": acc_tr,
                "eps": s.eps,
                "queries": s.queries,
                "stronger": stronger,
                "library_warnings": sorted(set(warnings)),
            },
        )

    def saturation(self) -> CheckResult:
        s = self.s
        fractions: dict[str, float] = {}
        for name in ev.SURFACES:
            count = 0
            with ev.surface(self.carso, name):
                for x, y, idx in self.batches:
                    count += int(ev.saturated_flags(self.carso, x, y, idx, seed=s.seed).bool().sum())
            fractions[name] = count / self.n
            self.tick("gradient saturation")
        paper, logsum = fractions[ev.PAPER_SURFACE], fractions[ev.LOGSUM_SURFACE]
        above = paper > s.saturation_threshold
        # Saturated where the logsum surface is not: the paper's surface hides robustness that is not there.
        status = "fail" if above and logsum <= s.saturation_threshold else "warn" if above else "pass"
        hint = (
            "cross-entropy attacks on the paper's surface are blunted: evaluate with "
            "`carso eval --attack adaptive` (the default), which attacks the same decision through dexp-logsum"
            if above
            else ""
        )
        return CheckResult(
            "saturation",
            "CE-gradient saturation (dexp vs dexp-logsum)",
            status,
            ", ".join(f"{name} {100 * f:.1f}%" for name, f in fractions.items()),
            f"dexp ≤ {100 * s.saturation_threshold:.0f}% of examples",
            {"fraction": fractions, "threshold": s.saturation_threshold, "hint": hint},
        )

    def indicators(self) -> CheckResult:
        title = f"attack-failure indicators (eval/{self.s.eval_name})"
        why, block = stored_indicators(self.run, self.s.eval_name) if self.run is not None else ("no run", None)
        if block is None:
            return CheckResult("indicators", title, "warn", "not evaluated", "none failed", {"hint": why})
        failed = block["failed"]
        hint = (
            (
                "an attack may have failed silently (see `carso eval`'s indicator table and the README): "
                + "; ".join(failed)
            )
            if failed
            else ""
        )
        return CheckResult(
            "indicators",
            title,
            "fail" if failed else "pass",
            f"{len(failed)} failed" + (f": {', '.join(failed[:3])}" if failed else ""),
            "none failed",
            {"failed": failed, "attacks": block["attacks"], "examples": block["examples"], "hint": hint},
        )


def stored_indicators(run: Path, name: str) -> tuple[str, dict[str, Any] | None]:
    """(why not, or "") and the ``indicators`` block of RUN/eval/NAME/results.json, if made with these weights."""
    path = run / "eval" / name / ev.RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"no readable {path}: run `carso eval` (--attack adaptive) first", None
    settings = results.get("settings") or {}
    weights = {
        "classifier_sha256": ckpt.sha256_file(ckpt.classifier_path_of(run)),
        "purifier_sha256": ckpt.sha256_file(run / ckpt.PURIFIER_FILE),
    }
    if any(settings.get(k) not in ("", None, v) for k, v in weights.items()):
        return f"{path} was made with other weights: evaluate again", None
    if not results.get("indicators"):
        return f"{path} has no indicators (--attack adaptive without --no-indicators makes them)", None
    return "", results["indicators"]


def run(
    run_dir: Path | None = None,
    *,
    settings: SanitySettings | None = None,
    device: str | None = None,
    data_root: Path = Path("data"),
    out: Path | None = None,
    console: Console | None = None,
) -> SanityReport:
    """Run the selected checks on a run directory; writes the JSON report (default RUN/sanity.json)."""
    from carso_cli.data import build_dataset
    from carso_cli.models import load_run

    started = time.time()
    dev = resolve_device(device)
    loaded = load_run(run_dir, dev)
    s = settings or SanitySettings()
    if (
        s.n_examples < 1
        or s.batch_size < 1
        or s.draws < 1
        or s.steps < 1
        or s.eot < 1
        or s.aa_steps < 1
        or s.aa_eot < 1
        or s.queries < 1
    ):
        raise CarsoError(
            "--n-examples, --batch-size, --draws, --steps, --eot, --aa-steps, --aa-eot and --queries must be at least 1"
        )
    if s.aggregation not in AGGREGATIONS:
        raise CarsoError(f"unknown aggregation '{s.aggregation}'")
    dataset = build_dataset(loaded.cfg, "test", root=str(data_root))
    n = min(s.n_examples, len(dataset))
    s.n_examples = n
    carso = loaded.carso(samples=s.samples, aggregation=s.aggregation)
    classifier = loaded.classifier
    for p in classifier.parameters():
        p.requires_grad_(False)
    classifier.eval()
    batches: Batches = []
    for rng in ev.batch_ranges(n, s.batch_size):
        x, y = ev.load_examples(dataset, rng)
        batches.append((x.to(dev), y.to(dev), rng))
    if console is not None:
        console.print(
            f"[bold]carso sanity[/] {escape(str(loaded.run))} — {n} examples, {s.samples} samples, "
            f"{s.aggregation} aggregation, "
            f"checks: {', '.join(s.checks)}",
            highlight=False,
        )
    progress = None
    if console is not None:
        from carso_cli.progress import progress_bar

        progress = progress_bar(console)
    results: list[CheckResult] = []
    log_path = loaded.run / "sanity-autoattack.log"  # AutoAttack's own lines: off the terminal, as in eval
    with ev.library_logging(console, log_path=log_path) as log_counts:
        if progress is not None:
            progress.start()
        try:
            task = progress.add_task("sanity", total=None) if progress is not None else None

            def tick(label: str) -> None:
                if progress is not None:
                    progress.update(task, description=label, advance=1)

            checker = Checker(carso, classifier, batches, s, loaded.cfg.data.num_classes, dev, tick, loaded.run)
            for key in CHECKS:
                if key in s.checks:
                    results.append(getattr(checker, key.replace("-", "_"))())
        finally:
            if progress is not None:
                progress.stop()
    report = SanityReport(loaded.run, s, results, time.time() - started)
    report.path = Path(out) if out is not None else loaded.run / "sanity.json"
    ckpt.atomic_write_text(report.path, ev.dumps_compact(report.to_json()))
    if console is not None:
        render(report, console)
        if log_counts["lines"]:
            console.print(
                f"[dim]AutoAttack's log: {log_counts['lines']} lines ({log_counts['warnings']} warnings, "
                f"shown above) in {escape(str(log_path))}[/]",
                highlight=False,
            )
    return report


STATUS = {"pass": "[green]✓ pass[/]", "fail": "[bold red]✗ FAIL[/]", "warn": "[yellow]! warn[/]"}


def render(report: SanityReport, console: Console) -> None:
    t = Table(title=f"sanity checks — {report.settings.aggregation} aggregation, {report.settings.n_examples} examples")
    t.add_column("#", justify="right")
    t.add_column("check")
    t.add_column("status")
    t.add_column("measured")
    t.add_column("threshold")
    for _i, c in enumerate(report.checks, 1):
        t.add_row(str(CHECKS.index(c.key) + 1), c.title, STATUS[c.status], c.measured, c.threshold)
    console.print(t)
    for c in report.checks:
        if c.status != "pass" and c.details.get("hint"):
            console.print(f"{c.key}: {c.details['hint']}", style="yellow", highlight=False, markup=False)
    verdict = "[green]all checks passed[/]" if report.passed else "[bold red]some checks failed[/]"
    console.print(f"{verdict} — report: {escape(str(report.path))}", highlight=False)


def cli(
    run: RunOpt = None,
    n_examples: Annotated[int, typer.Option("--n-examples", help="First N test examples.")] = 256,
    samples: Annotated[
        int | None, typer.Option("--samples", help="Reconstructions per input (default: the preset's).")
    ] = None,
    aggregation: Annotated[
        Aggregation | None, typer.Option("--aggregation", help=AGGREGATION_HELP + " (default: the preset's).")
    ] = None,
    checks: Annotated[
        str | None, typer.Option("--checks", help=f"Comma-separated subset of: {', '.join(CHECKS)} (default: all).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per batch.")] = 64,
    eps: Annotated[
        str | None, typer.Option("--eps", help="ε of the black-box comparison (default: the preset's).")
    ] = None,
    eps_list: Annotated[
        str, typer.Option("--eps-list", help="Increasing ε values of the monotonicity check.")
    ] = "2/255,4/255,8/255,16/255",
    large_eps: Annotated[
        str | None, typer.Option("--large-eps", help="ε of the large-ε check (default: the preset's sanity_eps, 0.95).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Short PGD+EoT steps (default: min(preset, 20)).")
    ] = None,
    eot: Annotated[
        int | None,
        typer.Option("--eot", help="EoT iterations of PGD+EoT and of the stability check (default: min(preset, 5))."),
    ] = None,
    aa_steps: Annotated[int, typer.Option("--aa-steps", help="APGD steps of the large-ε randAA.")] = 20,
    aa_eot: Annotated[
        int | None, typer.Option("--aa-eot", help="EoT iterations of the large-ε randAA (default: the preset's).")
    ] = None,
    draws: Annotated[int, typer.Option("--draws", help="Stochastic draws per example in the gradient check.")] = 4,
    queries: Annotated[int, typer.Option("--queries", help="Square attack queries.")] = 1000,
    chance_tolerance: Annotated[
        float, typer.Option("--chance-tolerance", help="Large-ε accuracy may exceed chance by this much.")
    ] = 0.05,
    max_bad_entries: Annotated[
        float, typer.Option("--max-bad-entries", help="Largest fraction of zero/non-finite gradient entries.")
    ] = 0.5,
    max_bad_gradients: Annotated[
        float, typer.Option("--max-bad-gradients", help="Largest fraction of useless gradients.")
    ] = 0.1,
    monotonic_tolerance: Annotated[
        float, typer.Option("--monotonic-tolerance", help="Allowed accuracy rise with ε, beyond noise.")
    ] = 0.05,
    min_eot_cosine: Annotated[
        float, typer.Option("--min-eot-cosine", help="Warn below this EoT-gradient agreement.")
    ] = 0.5,
    blackbox_tolerance: Annotated[
        float, typer.Option("--blackbox-tolerance", help="How much stronger a black-box attack may be, beyond noise.")
    ] = 0.05,
    saturation_threshold: Annotated[
        float,
        typer.Option(
            "--saturation-threshold",
            help=(
                "Largest fraction of examples with a numerically useless CE gradient (zero, non-finite, or not the "
                "float64 direction) on the paper's surface."
            ),
        ),
    ] = 0.1,
    eval_name: Annotated[
        str, typer.Option("--eval", help="The evaluation (RUN/eval/NAME) whose attack-failure indicators are checked.")
    ] = "adaptive",
    out: Annotated[Path | None, typer.Option("--out", help="JSON report (default: RUN/sanity.json).")] = None,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    data_root: DataRootOpt = Path("data"),
) -> None:
    """Checks an honest robustness claim needs (large ε, gradients, ε-monotonicity, EoT, black-box,
    saturation, attack-failure indicators)."""
    from carso_cli.cli import console
    from carso_cli.config import load_config

    cfg = load_config(ckpt.resolve_run(run) / ckpt.CONFIG_FILE)
    a = cfg.attacks
    s = SanitySettings(
        checks=parse_checks(checks),
        n_examples=n_examples,
        batch_size=batch_size,
        samples=cfg.inference.samples if samples is None else samples,
        aggregation=aggregation.value if aggregation else cfg.inference.aggregation,
        seed=seed,
        large_eps=a.sanity_eps if large_eps is None else parse_eps(large_eps, "--large-eps"),
        aa_steps=aa_steps,
        aa_eot=a.randaa_eot_iterations if aa_eot is None else aa_eot,
        chance_tolerance=chance_tolerance,
        draws=draws,
        max_bad_entries=max_bad_entries,
        max_bad_gradients=max_bad_gradients,
        eps=a.eps if eps is None else parse_eps(eps, "--eps"),
        eps_list=parse_eps_list(eps_list),
        steps=min(a.pgd_eot_steps, 20) if steps is None else steps,
        step_size=a.pgd_eot_step_size,
        eot=min(a.pgd_eot_iterations, 5) if eot is None else eot,
        monotonic_tolerance=monotonic_tolerance,
        min_eot_cosine=min_eot_cosine,
        queries=queries,
        blackbox_tolerance=blackbox_tolerance,
        saturation_threshold=saturation_threshold,
        eval_name=eval_name,
    )
    report = run_fn(run, settings=s, device=device, data_root=data_root, out=out, console=console)
    if not report.passed:
        raise typer.Exit(1)


run_fn = run
