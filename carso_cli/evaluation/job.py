"""``carso eval`` as a library call: one ``EvalJob`` (which run, the settings, where the results go) → the
runner (lock, resumable store, sharding) → the results file and, with a console, the tables.

Every attack source goes through the same path: the dataset attacked as ``settings.attack`` says, or the
examples of a file (``--adversarial``, ``carso_cli.adversarial.FileSource``).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from carso_cli import checkpoint as ckpt
from carso_cli import distributed, locking
from carso_cli.display import format_eps
from carso_cli.errors import CarsoError
from carso_cli.evaluation.runner import EvalOutcome
from carso_cli.evaluation.settings import EvalSettings
from carso_cli.evaluation.store import RESULTS_FILE, SETTINGS_FILE, ResultsStore
from carso_cli.progress import progress_bar


@dataclass
class EvalJob:
    """One evaluation: the run (None: the most recent under ./runs), what determines the numbers
    (``settings``), and how it runs. ``adversarial``: evaluate that file's examples instead of attacking;
    ``save_adversarial``: write every attack's adversarial examples there."""

    run: Path | None
    settings: EvalSettings
    device: torch.device
    name: str | None = None  # results go to RUN/eval/NAME (default: the attack, or adversarial-<file stem>)
    resume: bool = False
    data_root: Path = Path("data")
    adversarial: Path | None = None
    save_adversarial: Path | None = None

    def check(self) -> None:
        n = self.name
        if n is not None and (not n or Path(n).name != n or n in (".", "..")):
            raise CarsoError(f"--name must be a plain folder name (results go to RUN/eval/NAME), got {n!r}")
        if self.adversarial is not None and self.save_adversarial is not None:
            raise CarsoError("--save-adversarial writes an attack's examples; --adversarial runs none: drop one")
        if self.adversarial is not None:  # the file is the attack
            self.settings = replace(self.settings, attack="file", indicators=False)
        self.settings.validate()

    @property
    def folder(self) -> str:
        if self.name is not None:
            return self.name
        return f"adversarial-{self.adversarial.stem}" if self.adversarial is not None else self.settings.attack


@dataclass
class _Prepared:
    """What the runner needs, loaded: the run, its models and data, the store's settings, the source."""

    loaded: Any
    classifier: torch.nn.Module
    carso: torch.nn.Module | None
    dataset: Any
    stored: dict[str, Any]
    source: Any
    eval_dir: Path


def run_evaluation(job: EvalJob, console: Any = None, *, show_progress: bool = True) -> EvalOutcome:
    """Evaluate ``job``; returns the outcome (results on the main process). Prints when ``console`` is given."""
    job.check()
    sets = None
    if job.adversarial is not None:  # a bad file fails before the run and the dataset are loaded
        from carso_cli.adversarial import load_adversarial

        sets = load_adversarial(job.adversarial)
    ctx = distributed.setup(job.device)
    stack = ExitStack()  # rank 0: the lock of RUN/eval/NAME, held to the end
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes per batch: let cuDNN pick its fastest kernels
    try:
        p = _prepare(job, ctx, sets)
        if job.resume:  # a requeued job that had in fact finished: one line, nothing touched
            done = distributed.on_main(ctx, lambda: finished_evaluation(p.eval_dir, p.stored, job.save_adversarial))
            if done is not None:
                if console is not None and ctx.is_main:
                    console.print(done[0], soft_wrap=True, highlight=False, markup=False)
                return EvalOutcome(done[1], p.eval_dir / RESULTS_FILE, 0, 0)
        distributed.on_main(ctx, lambda: _lock(stack, p.eval_dir))
        store = ResultsStore(p.eval_dir, p.stored, job.resume)
        out = console if ctx.is_main else None
        outcome = _run(job, p, store, ctx, out, show_progress)
        if out is not None and outcome.results is not None:
            _report(job, outcome, out, p.eval_dir)
        if ctx.is_main and job.save_adversarial is not None and outcome.results is not None:
            _save_adversarial(job, store, outcome.results, p, out)
        return outcome
    except BaseException as err:
        stack.__exit__(type(err), err, err.__traceback__)  # the failure reaches the clean-up of a failed start
        raise
    finally:
        stack.close()
        distributed.teardown()


def _prepare(job: EvalJob, ctx: distributed.DistContext, sets: list[Any] | None) -> _Prepared:
    """Load the run and the test set (rank 0 first: it downloads), resolve ``n_examples``, build the source."""
    from carso_cli.data import build_dataset
    from carso_cli.models import load_run

    s = job.settings
    loaded = load_run(job.run, ctx.device)
    cfg = loaded.cfg
    need_data = sets is None or any(a.idx is not None for a in sets)
    dataset = None
    if ctx.is_main and need_data:
        dataset = build_dataset(cfg, "test", root=str(job.data_root))
    distributed.barrier(ctx)  # rank 0 downloads first, the others then read
    if not ctx.is_main and need_data:
        dataset = build_dataset(cfg, "test", root=str(job.data_root))
    if s.precision == "bfloat16" and ctx.device.type != "cuda":
        raise CarsoError("--precision bfloat16 needs a CUDA device")
    s.dataset = cfg.data.dataset
    s.classifier_sha256 = ckpt.sha256_file(ckpt.classifier_path_of(loaded.run))
    s.purifier_sha256 = ckpt.sha256_file(loaded.run / ckpt.PURIFIER_FILE)
    source, stored = None, s.to_json()
    if sets is not None and job.adversarial is not None:
        from carso_cli.adversarial import file_source

        source = file_source(job.adversarial, sets, cfg, s.eps, dataset)
        s.n_examples = len(source)
        stored = {
            **s.to_json(),
            "adversarial_file": str(job.adversarial),
            "adversarial_sha256": ckpt.sha256_file(job.adversarial),
        }
    else:
        s.n_examples = len(dataset) if s.n_examples is None else min(s.n_examples, len(dataset))
        stored = s.to_json()
    carso = loaded.carso(samples=s.samples, aggregation=s.aggregation) if "carso" in s.targets else None
    classifier = loaded.classifier
    for param in classifier.parameters():
        param.requires_grad_(False)
    classifier.eval()
    return _Prepared(loaded, classifier, carso, dataset, stored, source, loaded.run / "eval" / job.folder)


def _lock(stack: ExitStack, eval_dir: Path) -> None:
    """One writer per evaluation name; a failed start leaves no folder behind."""
    made = not eval_dir.exists()
    stack.enter_context(locking.hold(eval_dir, hint="wait for it, or use another --name"))
    ckpt.remove_temporaries(eval_dir)  # what a killed evaluation was writing
    stack.enter_context(ckpt.undo_on_failure(eval_dir, made, keep=[eval_dir / SETTINGS_FILE]))


def _run(
    job: EvalJob, p: _Prepared, store: ResultsStore, ctx: distributed.DistContext, out: Any, show_progress: bool
) -> EvalOutcome:
    """The header and the estimate, then the runner under the progress display."""
    from carso_cli import evaluation as ev  # through the package: a test replaces ev.evaluate

    s = job.settings
    estimate: float | None = None
    if out is not None:
        out.print(
            f"[bold]carso eval[/] {escape(str(p.loaded.run))} — {s.n_examples} examples of {s.dataset} "
            f"({s.split}), attack {s.attack}, ε = {format_eps(s.eps)}, {s.samples} samples, {s.aggregation} "
            f"aggregation, {ctx.world_size} process(es) on {ctx.device}",
            highlight=False,
        )
        estimate = _print_estimate(out, p, s, ctx)
    progress = progress_bar(out) if (out is not None and show_progress) else None
    if progress is not None:
        progress.start()
    try:
        return ev.evaluate(
            p.classifier,
            p.carso,
            p.dataset,
            s,
            store,
            ctx,
            run=p.loaded.run,
            progress=progress,
            console=out,
            keep_adversarial=job.save_adversarial is not None,
            estimate_s=estimate,
            source=p.source,
        )
    finally:
        if progress is not None:
            progress.stop()


def _report(job: EvalJob, outcome: EvalOutcome, out: Any, eval_dir: Path) -> None:
    from carso_cli.evaluation.render import render_results

    assert outcome.results is not None
    if job.resume:
        out.print(f"resumed: {outcome.resumed} batch(es) found on disk, {outcome.computed} computed")
    render_results(outcome.results, out)
    log = outcome.results.get("autoattack_log")
    if log:
        out.print(
            f"[dim]AutoAttack's log: {log['lines']} lines ({log['warnings']} warnings, shown above) "
            f"in {escape(str(eval_dir / log['file']))}[/]",
            highlight=False,
        )
    out.print(f"results: {outcome.path}", highlight=False, markup=False)


def _save_adversarial(job: EvalJob, store: ResultsStore, results: dict[str, Any], p: _Prepared, out: Any) -> None:
    from carso_cli.adversarial import save_adversarial
    from carso_cli.evaluation.runner import collect_adversarial

    assert job.save_adversarial is not None
    found = collect_adversarial(store, results)
    meta = {"run": str(p.loaded.run), "evaluation": str(p.eval_dir)}
    save_adversarial(job.save_adversarial, found["y"], found["idx"], found["attacks"], job.settings.eps, meta)
    if out is not None:
        names = ", ".join(found["attacks"])
        out.print(f"adversarial examples ({names}): {job.save_adversarial}", highlight=False, markup=False)


def finished_evaluation(
    eval_dir: Path, settings: dict[str, Any], save_adversarial: Path | None
) -> tuple[str, dict[str, Any]] | None:
    """(the line saying so, the results) when ``eval_dir`` holds the finished results of these settings
    (and ``--save-adversarial``'s file, if asked for); None when there is work left."""
    path = eval_dir / RESULTS_FILE
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


def _print_estimate(console: Any, p: _Prepared, s: EvalSettings, ctx: distributed.DistContext) -> float | None:
    """One line: a rough wall-time estimate (returned, seconds); a warning (not a stop) when it is long."""
    from carso_cli.evaluation.batch import load_examples
    from carso_cli.evaluation.cost import clean_fractions, estimate_seconds, format_duration

    if s.attack in ("none", "file"):
        return None
    # Attacks run only on the examples classified right: their share on the first 16 scales the attack
    # passes (on the demo's tiny model 10 of 32; without it the estimate was 3.4× long, BENCHMARKS.md).
    x, y = load_examples(p.dataset, range(min(s.n_examples or 0, 16)))
    x, y = x.to(ctx.device), y.to(ctx.device)
    attacked = clean_fractions(p.classifier, p.carso, x, y)
    num_classes = p.loaded.cfg.data.num_classes
    probe = min(s.batch_size, x.shape[0], 4)
    seconds = estimate_seconds(
        p.classifier, p.carso, x[:probe], y[:probe], s, num_classes, ctx.world_size, attacked=attacked
    )
    # An upper bound for the examples attacked: every attack on each to the end, where early attacks
    # break many and the later ones skip them.
    extra = " (as if no attack broke an example early)" if s.is_adaptive else ""
    if seconds > 3600:
        hint = "" if ctx.device.type == "cuda" else " on the CPU; a GPU is much faster"
        console.print(
            f"[yellow]warning: this evaluation may take {format_duration(seconds)}{hint}. Reduce it with "
            "--n-examples, --steps, --eot or --repeats, or spread it with --gpus; it can be interrupted and "
            "continued with --resume.[/]",
            highlight=False,
        )
    else:
        console.print(f"[dim]rough estimate: {format_duration(seconds)}{extra}[/]", highlight=False)
    return seconds
