"""The tables ``carso eval`` and ``carso sanity`` print: Table 2's columns, the adaptive evaluation, the
attack-failure indicators, the re-classification report, the saturation warnings, the sanity checklist."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from carso_cli.display import accuracy_cell, column_label, format_eps
from carso_cli.evaluation.checks import CHECKS
from carso_cli.evaluation.report import COLUMNS
from carso_cli.evaluation.saturation import AUTHORS_SURFACE
from carso_cli.evaluation.settings import SINGLE_ATTACKS


def render_results(results: dict[str, Any], console: Console) -> None:
    """Table 2's columns (with C/adaptive and the saturation column) and, for CARSO, the detail tables."""
    s = results["settings"]
    saturation = results.get("saturation")
    console.print(accuracy_table(results))
    if saturation:
        console.print(saturation_table(saturation))
    if results.get("adaptive"):
        console.print(adaptive_table(results["adaptive"]))
    if results.get("indicators"):
        render_indicators(results["indicators"], console)
    if results.get("reclassification"):
        console.print(reclassification_table(results["reclassification"], s))
    if saturation and saturation["flagged"]:
        _saturation_warnings(saturation, s["attack"], console)


def accuracy_table(results: dict[str, Any]) -> Table:
    """One row: Table 2's columns present (an examples file's ``AT/<attack>``, ``C/<attack>`` instead), the
    saturated fraction of the paper's surface."""
    s = results["settings"]
    metrics = results["metrics"]
    saturation = results.get("saturation")
    if s.get("attack") == "file":  # carso eval --adversarial FILE: a column per attack in the file
        columns = list(metrics)
        title = f"accuracy on {s['adversarial_file']} — {results['n_examples']} examples, ε = {format_eps(s['eps'])}"
    else:  # an empty PGD+EoT beside C/adaptive only costs width (its adaptive run is in the table below)
        alone = s.get("attack") in SINGLE_ATTACKS  # one adaptive attack alone: no randAA, its own C/ column
        shown = ("AT/Cl", "C/Cl", "AT/AA") + (() if alone else ("C/randAA",))
        shown += () if s.get("attack") == "adaptive" or alone else ("PGD+EoT",)
        columns = [c for c, _ in COLUMNS if c in metrics or c in shown]
        title = f"accuracy (Table 2) — ε = {format_eps(s['eps'])}, {results['n_examples']} examples"
    t = Table(title=Text(title))
    for c in columns:  # a header is never cut (at 80 columns "C/adaptive" became "C/adapti…"): cells wrap instead
        header = column_label(c, s.get("attack"))
        t.add_column(header, justify="right", min_width=len(header))
    cells = [accuracy_cell(metrics.get(c)) for c in columns]
    if saturation:  # the paper's surface (or the model's own): the worst of the clean and adversarial points
        name = next(iter(saturation["surfaces"]))
        worst = max(p["fraction"] for p in saturation["surfaces"][name].values())
        t.add_column("saturated", justify="right", min_width=len("saturated"))
        cells.append(f"[yellow]{100 * worst:.1f}%[/]" if name in saturation["flagged"] else f"{100 * worst:.1f}%")
    t.add_row(*cells)
    return t


def saturation_table(saturation: dict[str, Any]) -> Table:
    g = Table(
        title="examples with a numerically useless cross-entropy gradient (zero, NaN, or not the float64 "
        "direction), per attack surface (one draw)"
    )
    for col in ("surface", "clean point", "adversarial point"):
        g.add_column(col, justify="left" if col == "surface" else "right")
    for name, points in saturation["surfaces"].items():
        style = "yellow" if name in saturation["flagged"] else ""
        g.add_row(
            name,
            *(_saturated_cell(points[p]) if p in points else "—" for p in ("clean", "adversarial")),
            style=style,
        )
    return g


def adaptive_table(adaptive: dict[str, Any]) -> Table:
    alone = len(adaptive["attacks"]) == 1
    title = (
        f"{adaptive['attacks'][0]['attack']} alone — an example is robust only if it survives every candidate"
        if alone
        else "adaptive evaluation — an example is robust only if it survives every attack, in this order"
    )
    a = Table(title=title)
    for col in ("attack", "attacked", "broke first", "robust after", "time"):
        a.add_column(col, justify="left" if col == "attack" else "right")
    for row in adaptive["attacks"]:
        a.add_row(
            row["title"],
            str(row["attacked"]),
            str(row["broken_first"]),
            str(row["robust_after"]),
            f"{row['wall_s']:.1f} s",
        )
    w = adaptive["worst_case"]
    label = f"C/{adaptive['attacks'][0]['attack']} (every candidate)" if alone else "C/adaptive (worst case)"
    a.add_row(f"[bold]{label}[/]", "", "", f"[bold]{w['correct']}/{w['total']}[/]", "")
    return a


def reclassification_table(report: dict[str, Any], s: dict[str, Any]) -> Table:
    r = Table(title=f"CARSO re-classified {s['repeats']}× per example (stochastic: {s['samples']} samples)")
    r.add_column("")
    r.add_column("single draw", justify="right")
    r.add_column("mean ± std over draws", justify="right")
    r.add_column("worst case (all draws right)", justify="right")
    for name, v in report.items():
        r.add_row(
            name,
            f"{100 * v['single']:.2f}%",
            f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}%",
            f"{100 * v['worst']:.2f}%",
        )
    return r


def _saturated_cell(point: dict[str, Any]) -> str:
    nan = f", {point['nonfinite']} NaN" if point.get("nonfinite") else ""
    return f"{100 * point['fraction']:.1f}% ({point['saturated']}/{point['total']}{nan})"


def _saturation_warnings(saturation: dict[str, Any], attack: str, console: Console) -> None:
    """A flagged surface the evaluation attacks blunts it; the authors' surface blunts the paper's protocol."""
    flagged = [n for n in saturation["flagged"] if n != AUTHORS_SURFACE]
    threshold = f"{100 * saturation['threshold']:.0f}%"
    if flagged:
        remedy = "" if attack == "adaptive" else "; --attack adaptive attacks the same decision through dexp-logsum"
        console.print(
            f"[yellow]warning: the cross-entropy gradient is numerically useless (zero, NaN or wrong) for more "
            f"than {threshold} of examples on the {', '.join(flagged)} surface(s): cross-entropy attacks there "
            f"(APGD-CE, PGD+EoT) are blunted and overstate robustness{remedy}.[/]",
            highlight=False,
        )
    if AUTHORS_SURFACE in saturation["flagged"]:
        covered = (
            "C/adaptive attacks the same decision through dexp-logsum as well"
            if attack == "adaptive"
            else "--attack adaptive attacks the same decision through dexp-logsum"
        )
        console.print(
            f"[yellow]note: on the authors' float32 surface (dexp-authors), which the paper's protocol (C/randAA) "
            f"attacks, the cross-entropy gradient is useless for more than {threshold} of examples: APGD-CE there "
            f"is blunted and C/randAA overstates robustness; {covered}.[/]",
            highlight=False,
        )


def render_indicators(block: dict[str, Any], console: Console) -> None:
    """The attack-failure indicators, one row per attack; a failed indicator in yellow, then what it means."""
    from carso_cli.evaluation.adaptive import TITLES
    from carso_cli.evaluation.indicators import TITLES as INDICATOR_TITLES

    t = Table(
        title=f"attack-failure indicators (Pintor et al. 2022; ✗ = the attack may fail silently) — "
        f"ε = 0.5, 2× budget and EoT noise on the first {block['examples']} examples"
    )
    t.add_column("attack", no_wrap=True)
    for title in INDICATOR_TITLES.values():
        t.add_column(title)
    for name, row in block["attacks"].items():
        cells = []
        for key in INDICATOR_TITLES:
            ind = row.get(key)
            if ind is None:
                cells.append("[dim]—[/]")
            else:
                style = {"fail": "yellow", "n/a": "dim"}.get(ind["status"])
                mark = {"pass": "✓ ", "fail": "✗ "}.get(ind["status"], "")
                cells.append(f"[{style}]{mark}{ind['measured']}[/]" if style else f"{mark}{ind['measured']}")
        t.add_row(name, *cells)
    console.print(t)
    relative = block.get("relative_cost")
    cost = f" ({100 * relative:.0f}% of the adaptive attacks' {block['adaptive_wall_s']:.1f} s)" if relative else ""
    console.print(
        f"[dim]indicators: {block['wall_s']:.1f} s{cost}; --indicator-examples N, --no-indicators[/]", highlight=False
    )
    for failed in block["failed"]:
        name, key = failed.split(": ")
        console.print(
            f"[yellow]indicator failed — {TITLES.get(name, name)}, {INDICATOR_TITLES[key]} "
            f"({block['attacks'][name][key]['measured']}): {INDICATOR_HINTS[key]}[/]",
            highlight=False,
        )


INDICATOR_HINTS = {
    "reproduction": "the evaluated model does not reproduce some counted breaks (a bug of the evaluation; "
    "the indices are in results.json)",
    "unbounded": "at ε = 0.5 the attack leaves examples standing: it is blind on this model, its "
    "survivors prove nothing",
    "convergence": "not converged: twice the steps and EoT break more examples or raise the loss; raise --steps / "
    "--eot",
    "transfer": "transfer or black-box points break examples every white-box attack left: the gradients are not "
    "useful on this model",
    "eot_noise": "single-draw gradients disagree: the EoT iterations are too few for a stable direction (--eot)",
}


STATUS = {"pass": "[green]✓ pass[/]", "fail": "[bold red]✗ FAIL[/]", "warn": "[yellow]! warn[/]"}


def render_sanity(report: Any, console: Console) -> None:
    t = Table(title=f"sanity checks — {report.settings.aggregation} aggregation, {report.settings.n_examples} examples")
    t.add_column("#", justify="right")
    t.add_column("check")
    t.add_column("status")
    t.add_column("measured")
    t.add_column("threshold")
    for _i, c in enumerate(report.checks, 1):
        t.add_row(str(list(CHECKS).index(c.key) + 1), c.title, STATUS[c.status], c.measured, c.threshold)
    console.print(t)
    for c in report.checks:
        if c.status != "pass" and c.details.get("hint"):
            console.print(f"{c.key}: {c.details['hint']}", style="yellow", highlight=False, markup=False)
    verdict = "[green]all checks passed[/]" if report.passed else "[bold red]some checks failed[/]"
    console.print(f"{verdict} — report: {escape(str(report.path))}", highlight=False)
