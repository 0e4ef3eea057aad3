"""Robustness curves over ε (issue 20): the same evaluation at several radii, accuracy against ε.

Each radius is an evaluation of its own (``RUN/eval/NAME-eps-8_255``: lock, resumable store, tables), so
an interrupted curve continues with ``--resume`` radius by radius. The curve itself goes to
``RUN/eval/NAME-curve/`` as ``curve.json`` and ``curve.png``: one line per model and attack (Table 2's
attacked columns, C/adaptive included), the clean accuracy at ε = 0, the preset's ε marked.

A robust accuracy can only fall as ε grows (a larger ball holds every point of a smaller one), so a rise
beyond the sampling noise of the two accuracies is flagged: the classic sign that the attack, not the
model, failed at the larger radius (gradient masking; Carlini et al. 2019, "On evaluating adversarial
robustness", section 5.2).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from carso_cli import checkpoint as ckpt
from carso_cli.display import column_label, format_eps
from carso_cli.errors import CarsoError
from carso_cli.evaluation.checks import noise
from carso_cli.evaluation.job import EvalJob, run_evaluation

CURVE_FILE = "curve.json"
CURVE_PLOT = "curve.png"


def parse_radii(text: str) -> list[float]:
    """``"2/255, 4/255,8/255"`` → the radii, sorted and distinct; each in (0, 1]."""
    from carso_cli.config import parse_eps

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CarsoError("--eps-curve needs radii, e.g. --eps-curve 2/255,4/255,8/255")
    radii = sorted({parse_eps(t, "--eps-curve") for t in items})
    if radii[0] <= 0.0 or radii[-1] > 1.0:
        raise CarsoError(
            f"--eps-curve radii must lie in (0, 1] (ε = 0 is the clean accuracy, drawn anyway), got {text}"
        )
    return radii


def radius_folder(base: str, eps: float) -> str:
    """The evaluation folder of one radius: ``adaptive-eps-8_255``."""
    return f"{base}-eps-{format_eps(eps).replace('/', '_')}"


def curve_lines(points: list[tuple[float, dict[str, Any]]]) -> dict[str, list[dict[str, float]]]:
    """Per attacked column of the results' ``metrics`` (not the clean ones), its accuracy at each radius,
    preceded by the model's clean accuracy at ε = 0 (AT/… starts from AT/Cl, CARSO's columns from C/Cl)."""
    lines: dict[str, list[dict[str, float]]] = {}
    for eps, results in points:
        metrics = results.get("metrics") or {}
        attack = (results.get("settings") or {}).get("attack")
        for column, m in metrics.items():
            if column.endswith("/Cl") or not isinstance(m, dict) or "accuracy" not in m:
                continue
            label = column_label(column, attack)
            if label not in lines:
                clean = metrics.get("AT/Cl" if column.startswith("AT/") else "C/Cl")  # CARSO's: C/…, PGD+EoT
                lines[label] = [_point(0.0, clean)] if isinstance(clean, dict) else []
            lines[label].append(_point(eps, m))
    return lines


def _point(eps: float, m: dict[str, Any]) -> dict[str, float]:
    return {"eps": eps, "accuracy": float(m["accuracy"]), "correct": m.get("correct"), "total": m.get("total")}


def curve_rises(lines: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Every step of a line where the accuracy rises with ε by more than two standard errors of the
    difference (``checks.noise``; n the examples evaluated): a curve must be non-increasing."""
    rises = []
    for column, pts in lines.items():
        for a, b in itertools.pairwise(pts):
            n = int(b.get("total") or a.get("total") or 1)
            allowed = noise(a["accuracy"], b["accuracy"], n)
            if b["accuracy"] - a["accuracy"] > allowed:
                rise = b["accuracy"] - a["accuracy"]
                rises.append(
                    {"column": column, "from_eps": a["eps"], "to_eps": b["eps"], "rise": rise, "allowed": allowed}
                )
    return rises


@dataclass
class CurveResult:
    path: Path  # curve.json
    plot: Path | None
    curve: dict[str, Any]


def run_curve(
    job: EvalJob, radii: list[float], console: Any = None, *, preset_eps: float | None = None
) -> CurveResult | None:
    """Evaluate ``job`` at every radius (each its own resumable evaluation), then write the curve (main process;
    None elsewhere). ``preset_eps`` is marked on the plot."""
    base = job.folder
    points: list[tuple[float, dict[str, Any]]] = []
    for k, eps in enumerate(radii):
        if console is not None:
            console.rule(f"ε = {format_eps(eps)}  ({k + 1}/{len(radii)} of the curve)")
        sub = replace(job, settings=replace(job.settings, eps=eps), name=radius_folder(base, eps))
        outcome = run_evaluation(sub, console)
        if outcome.results is None:  # not the main process
            continue
        points.append((eps, outcome.results))
    if not points:
        return None
    run_dir = Path(points[0][1]["run"])  # the run the evaluations resolved (--run, or the latest)
    lines = curve_lines(points)
    curve = {
        "format": "carso-curve/1",
        "run": str(run_dir),
        "attack": job.settings.attack,
        "radii": radii,
        "preset_eps": preset_eps,
        "n_examples": points[0][1].get("n_examples"),
        "evaluations": [radius_folder(base, eps) for eps in radii],
        "lines": lines,
        "rises": curve_rises(lines),
    }
    folder = run_dir / "eval" / f"{base}-curve"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(folder / CURVE_FILE, curve)
    plot = plot_curve(curve, folder / CURVE_PLOT)
    return CurveResult(folder / CURVE_FILE, plot, curve)


def plot_curve(curve: dict[str, Any], out: Path) -> Path:
    """Accuracy (%) against ε (×1/255): one line per column, the preset's ε dotted, flagged rises circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    for column, pts in curve["lines"].items():
        style = "--" if column.startswith("AT/") else "-"
        ax.plot([255 * p["eps"] for p in pts], [100 * p["accuracy"] for p in pts], style, marker="o", label=column)
    for r in curve["rises"]:
        end = next(p for p in curve["lines"][r["column"]] if p["eps"] == r["to_eps"])
        ax.scatter([255 * r["to_eps"]], [100 * end["accuracy"]], s=160, facecolors="none", edgecolors="red", zorder=5)
    if curve.get("preset_eps"):
        ax.axvline(
            255 * curve["preset_eps"],
            color="grey",
            linestyle=":",
            label=f"preset ε = {format_eps(curve['preset_eps'])}",
        )
    ax.set_xlabel("ε (×1/255, L∞)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    flagged = f" — {len(curve['rises'])} rise(s) flagged (red)" if curve["rises"] else ""
    ax.set_title(
        f"robustness curve, --attack {curve['attack']}, {curve.get('n_examples')} examples{flagged}", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with ckpt.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def render_curve(result: CurveResult, console: Any) -> None:
    """The curve as a table (a row per column, a cell per radius), the rises in yellow, then the files."""
    from rich.table import Table

    c = result.curve
    table = Table(title=f"robustness curve — --attack {c['attack']}, {c.get('n_examples')} examples")
    table.add_column("")
    eps_all = sorted({p["eps"] for pts in c["lines"].values() for p in pts})
    for eps in eps_all:
        mark = " (preset)" if c.get("preset_eps") is not None and abs(eps - c["preset_eps"]) < 1e-9 else ""
        table.add_column(f"ε = {format_eps(eps)}{mark}" if eps else "clean", justify="right")
    flagged = {(r["column"], r["to_eps"]) for r in c["rises"]}
    for column, pts in c["lines"].items():
        by_eps = {p["eps"]: p for p in pts}
        cells = []
        for eps in eps_all:
            p = by_eps.get(eps)
            text = "" if p is None else f"{100 * p['accuracy']:.2f}%"
            cells.append(f"[yellow]{text} ↑[/]" if (column, eps) in flagged else text)
        table.add_row(column, *cells)
    console.print(table)
    for r in c["rises"]:
        console.print(
            f"[yellow]warning: {r['column']} rises from ε = {format_eps(r['from_eps'])} to {format_eps(r['to_eps'])} "
            f"by {100 * r['rise']:.1f} points (noise allows {100 * r['allowed']:.1f}): the attack failed at the "
            "larger radius (gradient masking?), raise --steps / --eot[/]",
            highlight=False,
        )
    console.print(f"curve: {result.path}" + (f" and {result.plot.name}" if result.plot else ""), markup=False)
