"""``carso eval``: clean and robust accuracy of the classifier and of CARSO (the paper's Table 2).

The classifier alone is attacked by the standard AutoAttack, CARSO end-to-end by the randomized one
(APGD-CE + APGD-DLR with EoT), both through pyautoattack (section 5.1); ``--attack pgd-eot`` runs the
PGD+EoT pipeline of Lee & Kim 2024 instead (Table 14). Whenever CARSO is evaluated the default is
``--attack adaptive``: the paper's randAA plus attacks through other surfaces and transfers, with the
per-example worst case (C/adaptive, issue 8); ``--attack autoattack`` is the paper's protocol alone.
The machinery — seeding, resume, sharding — lives in the package ``carso_cli/evaluation/``.
"""

from __future__ import annotations

from contextlib import ExitStack
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from carso_cli import checkpoint as ckpt
from carso_cli import distributed, locking
from carso_cli import evaluation as ev
from carso_cli.aggregation import AGGREGATIONS
from carso_cli.commands._common import (
    AGGREGATION_HELP,
    Aggregation,
    DataRootOpt,
    DeviceOpt,
    GpusOpt,
    SeedOpt,
    resolve_device,
)
from carso_cli.config import parse_eps
from carso_cli.display import accuracy_cell, format_eps
from carso_cli.errors import CarsoError
from carso_cli.progress import progress_bar

# "--run-dir" is what the torchrun workers get: torchrun's own parser takes "--run" for an ambiguous
# abbreviation of its "--run-path" and stops.
RunOpt = Annotated[
    Path | None, typer.Option("--run", "--run-dir", help="Run directory (default: the most recent under ./runs).")
]


class Attack(str, Enum):
    adaptive = "adaptive"
    autoattack = "autoattack"
    pgd_eot = "pgd-eot"
    none = "none"


class Target(str, Enum):
    both = "both"
    classifier = "classifier"
    carso = "carso"


class Precision(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


def build_settings(
    cfg: Any,
    *,
    attack: str,
    target: str,
    eps: str | float | None,
    n_examples: int | None,
    dataset_size: int,
    batch_size: int,
    samples: int | None,
    aggregation: str | None,
    seed: int,
    repeats: int,
    steps: int | None,
    eot: int | None,
    queries: int,
    precision: str = "float32",
    square: bool = False,
    saturation_threshold: float = 0.1,
    restarts: int | None = None,
    eot_normalise: bool | None = None,
    indicators: bool = True,
    indicator_examples: int = 8,
) -> ev.EvalSettings:
    """EvalSettings from the options; the preset supplies ε, samples, aggregation, steps and EoT."""
    if square and attack != "adaptive":
        raise CarsoError(
            f"--square adds the Square attack to --attack adaptive; it has no effect with --attack {attack}"
        )
    eps_value = cfg.attacks.eps if eps is None else parse_eps(eps, "--eps")
    if n_examples is not None and n_examples < 1:
        raise CarsoError(f"--n-examples must be at least 1, got {n_examples}")
    n = dataset_size if n_examples is None else min(n_examples, dataset_size)
    agg = aggregation or cfg.inference.aggregation
    if agg not in AGGREGATIONS:
        raise CarsoError(f"unknown aggregation '{agg}'")
    s = ev.EvalSettings(
        attack=attack,
        targets=list(ev.TARGETS) if target == "both" else [target],
        eps=eps_value,
        n_examples=n,
        batch_size=batch_size,
        samples=cfg.inference.samples if samples is None else samples,
        aggregation=agg,
        seed=seed,
        repeats=repeats,
        aa_steps=100 if steps is None else steps,  # section 5.1: 100 steps
        aa_eot=cfg.attacks.randaa_eot_iterations if eot is None else eot,
        square_queries=queries,
        pgd_steps=cfg.attacks.pgd_eot_steps if steps is None else steps,
        pgd_step_size=cfg.attacks.pgd_eot_step_size,
        pgd_eot=cfg.attacks.pgd_eot_iterations if eot is None else eot,
        square=square,
        saturation_threshold=saturation_threshold,
        restarts=restarts,
        eot_normalise=eot_normalise,
        indicators=indicators and attack == "adaptive",
        indicator_examples=indicator_examples,
        precision=precision,
        dataset=cfg.data.dataset,
    )
    if s.samples < 0:
        raise CarsoError(f"--samples must be ≥ 0, got {s.samples}")
    s.validate()
    return s


def default_attack(target: str) -> str:
    """The adaptive evaluation whenever CARSO is evaluated (issue 8); the paper's AutoAttack otherwise."""
    return "autoattack" if target == "classifier" else "adaptive"


def run(
    run_dir: Path | None = None,
    *,
    attack: str | None = None,
    target: str = "both",
    eps: str | float | None = None,
    n_examples: int | None = None,
    batch_size: int = 64,
    samples: int | None = None,
    aggregation: str | None = None,
    device: str | None = None,
    seed: int = 0,
    resume: bool = False,
    repeats: int = 10,
    steps: int | None = None,
    eot: int | None = None,
    queries: int = 5000,
    name: str | None = None,
    data_root: Path = Path("data"),
    precision: str = "float32",
    square: bool = False,
    saturation_threshold: float = 0.1,
    restarts: int | None = None,
    eot_normalise: bool | None = None,
    indicators: bool = True,
    indicator_examples: int = 8,
    console: Console | None = None,
    show_progress: bool = True,
    adversarial: Path | None = None,
    save_adversarial: Path | None = None,
) -> ev.EvalOutcome:
    """Evaluate a run; returns the outcome (results on the main process). Prints when ``console`` is given.

    With ``adversarial``: the examples of that file instead of an attack (``carso_cli.adversarial``).
    With ``save_adversarial``: every attack's adversarial examples (and the adaptive worst case) with
    labels, test-set indices and per-example flags, to that safetensors file.
    """
    if adversarial is not None:
        from carso_cli.adversarial import run_eval

        results = run_eval(
            run_dir,
            adversarial,
            target=target,
            name=name,
            seed=seed,
            repeats=repeats,
            batch_size=batch_size,
            samples=samples,
            aggregation=aggregation,
            eps=eps,
            device=resolve_device(device),
            data_root=data_root,
            console=console,
        )
        return ev.EvalOutcome(results, Path(results.pop("path")), 1, 0)
    attack = attack or default_attack(target)
    from carso_cli.data import build_dataset
    from carso_cli.models import load_run

    if name is not None and (not name or Path(name).name != name or name in (".", "..")):
        raise CarsoError(f"--name must be a plain folder name (results go to RUN/eval/NAME), got {name!r}")
    ctx = distributed.setup(resolve_device(device))
    stack = ExitStack()  # rank 0: the lock of RUN/eval/NAME, held to the end
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes per batch: let cuDNN pick its fastest kernels
    try:
        loaded = load_run(run_dir, ctx.device)
        cfg = loaded.cfg
        if ctx.is_main:
            dataset = build_dataset(cfg, "test", root=str(data_root))
        distributed.barrier(ctx)  # rank 0 downloads first, the others then read
        if not ctx.is_main:
            dataset = build_dataset(cfg, "test", root=str(data_root))
        s = build_settings(
            cfg,
            attack=attack,
            target=target,
            eps=eps,
            n_examples=n_examples,
            dataset_size=len(dataset),
            batch_size=batch_size,
            samples=samples,
            aggregation=aggregation,
            seed=seed,
            repeats=repeats,
            steps=steps,
            eot=eot,
            queries=queries,
            precision=precision,
            square=square,
            saturation_threshold=saturation_threshold,
            restarts=restarts,
            eot_normalise=eot_normalise,
            indicators=indicators,
            indicator_examples=indicator_examples,
        )
        if s.precision == "bfloat16" and ctx.device.type != "cuda":
            raise CarsoError("--precision bfloat16 needs a CUDA device")
        s.classifier_sha256 = ckpt.sha256_file(ckpt.classifier_path_of(loaded.run))
        s.purifier_sha256 = ckpt.sha256_file(loaded.run / ckpt.PURIFIER_FILE)
        carso = loaded.carso(samples=s.samples, aggregation=s.aggregation) if "carso" in s.targets else None
        classifier = loaded.classifier
        for p in classifier.parameters():
            p.requires_grad_(False)
        classifier.eval()
        eval_dir = loaded.run / "eval" / (name or s.attack)
        if resume:  # a requeued job that had in fact finished: one line, nothing touched
            done = distributed.on_main(ctx, lambda: finished_evaluation(eval_dir, s.to_json(), save_adversarial))
            if done is not None:
                if console is not None and ctx.is_main:
                    console.print(done[0], soft_wrap=True, highlight=False, markup=False)
                return ev.EvalOutcome(done[1], eval_dir / ev.RESULTS_FILE, 0, 0)

        def lock() -> None:  # one writer per evaluation name; a failed start leaves no folder behind
            made = not eval_dir.exists()
            stack.enter_context(locking.hold(eval_dir, hint="wait for it, or use another --name"))
            ckpt.remove_temporaries(eval_dir)  # what a killed evaluation was writing
            stack.enter_context(ckpt.undo_on_failure(eval_dir, made, keep=[eval_dir / ev.SETTINGS_FILE]))

        distributed.on_main(ctx, lock)
        store = ev.ResultsStore(eval_dir, s.to_json(), resume)
        out = console if ctx.is_main else None
        estimate: float | None = None
        if out is not None:
            out.print(
                f"[bold]carso eval[/] {escape(str(loaded.run))} — {s.n_examples} examples of {cfg.data.dataset} "
                f"({s.split}), "
                f"attack {s.attack}, ε = {format_eps(s.eps)}, {s.samples} samples, {s.aggregation} aggregation, "
                f"{ctx.world_size} process(es) on {ctx.device}",
                highlight=False,
            )
            estimate = _print_estimate(out, classifier, carso, dataset, s, cfg.data.num_classes, ctx)
        progress = progress_bar(out) if (out is not None and show_progress) else None
        if progress is not None:
            progress.start()
        try:
            outcome = ev.evaluate(
                classifier,
                carso,
                dataset,
                s,
                store,
                ctx,
                run=loaded.run,
                progress=progress,
                console=out,
                keep_adversarial=save_adversarial is not None,
                estimate_s=estimate,
            )
        finally:
            if progress is not None:
                progress.stop()
        if out is not None and outcome.results is not None:
            if resume:
                out.print(f"resumed: {outcome.resumed} batch(es) found on disk, {outcome.computed} computed")
            render(outcome.results, out)
            log = outcome.results.get("autoattack_log")
            if log:
                out.print(
                    f"[dim]AutoAttack's log: {log['lines']} lines ({log['warnings']} warnings, shown above) "
                    f"in {escape(str(eval_dir / log['file']))}[/]",
                    highlight=False,
                )
            out.print(f"results: {outcome.path}", highlight=False, markup=False)
        if ctx.is_main and save_adversarial is not None and outcome.results is not None:
            from carso_cli.adversarial import save_adversarial as write
            from carso_cli.evaluation.runner import collect_adversarial

            found = collect_adversarial(store, outcome.results)
            write(
                save_adversarial,
                found["y"],
                found["idx"],
                found["attacks"],
                s.eps,
                {"run": str(loaded.run), "evaluation": str(eval_dir)},
            )
            if out is not None:
                out.print(
                    f"adversarial examples ({', '.join(found['attacks'])}): {save_adversarial}",
                    highlight=False,
                    markup=False,
                )
        return outcome
    except BaseException as err:
        stack.__exit__(type(err), err, err.__traceback__)  # the failure reaches the clean-up of a failed start
        raise
    finally:
        stack.close()
        distributed.teardown()


def finished_evaluation(
    eval_dir: Path, settings: dict[str, Any], save_adversarial: Path | None
) -> tuple[str, dict[str, Any]] | None:
    """(the line saying so, the results) when ``eval_dir`` holds the finished results of these settings
    (and ``--save-adversarial``'s file, if asked for); None when there is work left."""
    import json

    path = eval_dir / ev.RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if results.get("settings") != settings or (save_adversarial is not None and not save_adversarial.is_file()):
        return None
    return (
        f"{eval_dir} is complete: {path.name} holds all {results.get('n_examples')} examples; nothing to do "
        f"(carso report {eval_dir} shows them)",
        results,
    )


def _print_estimate(
    console: Console,
    classifier: torch.nn.Module,
    carso: torch.nn.Module | None,
    dataset: Any,
    s: ev.EvalSettings,
    num_classes: int,
    ctx: distributed.DistContext,
) -> float | None:
    """One line: a rough wall-time estimate (returned, seconds); a warning (not a stop) when it is long."""
    if s.attack == "none":
        return None
    x, y = ev.load_examples(dataset, range(min(s.batch_size, s.n_examples, 4)))
    seconds = ev.estimate_seconds(classifier, carso, x.to(ctx.device), y.to(ctx.device), s, num_classes, ctx.world_size)
    # passes_per_example counts every attack on every example to the end: examples the classifier gets
    # wrong or an early attack breaks cost less, so a weak model finishes well inside it.
    extra = " (as if every example resisted every attack)" if s.attack == "adaptive" else ""
    text = f"rough estimate: {ev.format_duration(seconds)}{extra}"
    if seconds > 3600:
        hint = "" if ctx.device.type == "cuda" else " on the CPU; a GPU is much faster"
        console.print(
            f"[yellow]warning: this evaluation may take {ev.format_duration(seconds)}{hint}. Reduce it with "
            "--n-examples, --steps, --eot or --repeats, or spread it with --gpus; it can be interrupted and "
            "continued with --resume.[/]",
            highlight=False,
        )
    else:
        console.print(f"[dim]{text}[/]", highlight=False)
    return seconds


def render(results: dict[str, Any], console: Console) -> None:
    """Table 2's columns (with C/adaptive and the saturation column) and, for CARSO, the detail tables."""
    s = results["settings"]
    metrics = results["metrics"]
    # Table 2's columns; an empty PGD+EoT beside C/adaptive only costs width (its adaptive run is in the table below).
    shown = ("AT/Cl", "C/Cl", "AT/AA", "C/randAA") + (() if s.get("attack") == "adaptive" else ("PGD+EoT",))
    columns = [c for c, _ in ev.COLUMNS if c in metrics or c in shown]
    saturation = results.get("saturation")
    t = Table(title=f"accuracy (Table 2) — ε = {format_eps(s['eps'])}, {results['n_examples']} examples")
    for c in columns:  # a header is never cut (at 80 columns "C/adaptive" became "C/adapti…"): cells wrap instead
        t.add_column(c, justify="right", min_width=len(c))
    cells = [accuracy_cell(metrics.get(c)) for c in columns]
    if saturation:  # the paper's surface (or the model's own): the worst of the clean and adversarial points
        name = next(iter(saturation["surfaces"]))
        worst = max(p["fraction"] for p in saturation["surfaces"][name].values())
        t.add_column("saturated", justify="right", min_width=len("saturated"))
        cells.append(f"[yellow]{100 * worst:.1f}%[/]" if name in saturation["flagged"] else f"{100 * worst:.1f}%")
    t.add_row(*cells)
    console.print(t)
    if saturation:
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
        console.print(g)
    adaptive = results.get("adaptive")
    if adaptive:
        a = Table(title="adaptive evaluation — an example is robust only if it survives every attack, in this order")
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
        a.add_row("[bold]C/adaptive (worst case)[/]", "", "", f"[bold]{w['correct']}/{w['total']}[/]", "")
        console.print(a)
    if results.get("indicators"):
        render_indicators(results["indicators"], console)
    report = results.get("reclassification") or {}
    if report:
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
        console.print(r)
    if saturation and saturation["flagged"]:
        _saturation_warnings(saturation, s["attack"], console)


def _saturated_cell(point: dict[str, Any]) -> str:
    nan = f", {point['nonfinite']} NaN" if point.get("nonfinite") else ""
    return f"{100 * point['fraction']:.1f}% ({point['saturated']}/{point['total']}{nan})"


def _saturation_warnings(saturation: dict[str, Any], attack: str, console: Console) -> None:
    """A flagged surface the evaluation attacks blunts it; the authors' surface blunts the paper's protocol."""
    flagged = [n for n in saturation["flagged"] if n != ev.AUTHORS_SURFACE]
    threshold = f"{100 * saturation['threshold']:.0f}%"
    if flagged:
        remedy = "" if attack == "adaptive" else "; --attack adaptive attacks the same decision through dexp-logsum"
        console.print(
            f"[yellow]warning: the cross-entropy gradient is numerically useless (zero, NaN or wrong) for more "
            f"than {threshold} of examples on the {', '.join(flagged)} surface(s): cross-entropy attacks there "
            f"(APGD-CE, PGD+EoT) are blunted and overstate robustness{remedy}.[/]",
            highlight=False,
        )
    if ev.AUTHORS_SURFACE in saturation["flagged"]:
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


def cli(
    ctx: typer.Context,
    run: RunOpt = None,
    attack: Annotated[
        Attack | None,
        typer.Option(
            "--attack",
            help=(
                "adaptive (default when CARSO is evaluated): the per-example worst case over randAA on the paper's "
                "and the dexp-logsum surface, PGD+EoT on dexp-logsum and transfer attacks; autoattack: the paper's "
                "protocol, standard AA on the classifier, randAA on CARSO (section 5.1); pgd-eot: Lee & Kim 2024 "
                "(Table 14); none: clean only."
            ),
        ),
    ] = None,
    target: Annotated[Target, typer.Option("--target", help="Which model(s) to evaluate.")] = Target.both,
    eps: Annotated[
        str | None,
        typer.Option("--eps", help="ℓ∞ radius: a fraction like 8/255 or a float in [0, 1] (default: the preset's)."),
    ] = None,
    n_examples: Annotated[
        int | None, typer.Option("--n-examples", help="First N test examples (default: all).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Examples per batch (CARSO runs samples× as many images).")
    ] = 64,
    samples: Annotated[
        int | None, typer.Option("--samples", help="Reconstructions per input (default: the preset's, 8).")
    ] = None,
    aggregation: Annotated[
        Aggregation | None, typer.Option("--aggregation", help=AGGREGATION_HELP + " (default: the preset's).")
    ] = None,
    gpus: GpusOpt = 1,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an interrupted evaluation of the same name, skipping finished batches."
        ),
    ] = False,
    repeats: Annotated[
        int, typer.Option("--repeats", help="Re-classify each clean and adversarial example this many times (CARSO).")
    ] = 10,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Attack steps (default: 100 for AutoAttack, the preset's for PGD+EoT)."),
    ] = None,
    eot: Annotated[int | None, typer.Option("--eot", help="EoT iterations (default: the preset's).")] = None,
    queries: Annotated[int, typer.Option("--queries", help="Square attack queries in the standard AutoAttack.")] = 5000,
    name: Annotated[
        str | None, typer.Option("--name", help="Results go to RUN/eval/NAME (default: the attack's name).")
    ] = None,
    data_root: DataRootOpt = Path("data"),
    precision: Annotated[
        Precision,
        typer.Option("--precision", help="bfloat16 autocast for CARSO on CUDA (faster; float32 is the reference)."),
    ] = Precision.float32,
    save_adversarial: Annotated[
        Path | None,
        typer.Option(
            "--save-adversarial",
            help=(
                "Write every attack's adversarial examples, labels, test-set indices and per-example flags to this "
                "safetensors file."
            ),
        ),
    ] = None,
    adversarial: Annotated[
        Path | None,
        typer.Option(
            "--adversarial",
            help=(
                "Evaluate on the adversarial examples of this file (.safetensors, or .pt with x_adv, y, optionally "
                "idx) instead of attacking."
            ),
        ),
    ] = None,
    square: Annotated[
        bool, typer.Option("--square", help="Add the Square black-box attack (--queries) to --attack adaptive.")
    ] = False,
    saturation_threshold: Annotated[
        float,
        typer.Option(
            "--saturation-threshold",
            help=(
                "Warn when more than this fraction of examples has a numerically useless CE gradient (zero, "
                "non-finite, or not the float64 direction) on an attack surface."
            ),
        ),
    ] = 0.1,
    restarts: Annotated[
        int | None,
        typer.Option(
            "--restarts",
            help=(
                "PGD+EoT runs per example, the first from x, the others from random starts; the highest-loss point "
                "is kept (default: 1 for --attack pgd-eot, the paper's; 2 inside --attack adaptive)."
            ),
        ),
    ] = None,
    eot_normalise: Annotated[
        bool | None,
        typer.Option(
            "--eot-normalise/--no-eot-normalise",
            help=(
                "Scale each EoT draw's gradient to unit norm before averaging in PGD+EoT (default: off for --attack "
                "pgd-eot, the paper's; on inside --attack adaptive)."
            ),
        ),
    ] = None,
    indicator_examples: Annotated[
        int,
        typer.Option(
            "--indicator-examples",
            help=(
                "Attack-failure indicators of --attack adaptive (unbounded ε, convergence, EoT noise) on the first N "
                "examples."
            ),
        ),
    ] = 8,
    no_indicators: Annotated[bool, typer.Option("--no-indicators", help="Skip the attack-failure indicators.")] = False,
) -> None:
    """Clean and robust accuracy of the classifier and of CARSO (the paper's Table 2)."""
    from carso_cli.cli import console, debug_enabled

    if adversarial is not None and gpus > 1:
        raise CarsoError("--adversarial runs in one process: drop --gpus")
    if distributed.should_relaunch(gpus):
        distributed.check_gpus(gpus, device)
        argv = distributed.relaunch_argv(ctx)  # every option as parsed, --no-x included
        try:
            code = distributed.relaunch(gpus, argv, debug=debug_enabled())
        except distributed.RankDied as died:  # an evaluation keeps every finished batch
            raise died.resumable("the finished batches are kept", argv) from None
        if code != 0:
            raise typer.Exit(code)
        return
    run_fn(
        run,
        attack=attack.value if attack else None,
        target=target.value,
        eps=eps,
        n_examples=n_examples,
        batch_size=batch_size,
        samples=samples,
        aggregation=aggregation.value if aggregation else None,
        device=device,
        seed=seed,
        resume=resume,
        repeats=repeats,
        steps=steps,
        eot=eot,
        queries=queries,
        name=name,
        data_root=data_root,
        precision=precision.value,
        square=square,
        saturation_threshold=saturation_threshold,
        console=console,
        restarts=restarts,
        eot_normalise=eot_normalise,
        adversarial=adversarial,
        save_adversarial=save_adversarial,
        indicators=not no_indicators,
        indicator_examples=indicator_examples,
    )


run_fn = run  # ``cli`` has a parameter named ``run`` (the option --run)
