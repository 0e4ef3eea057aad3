"""The whole split: sharded over processes (whole batches, contiguous ranges), resumable, gathered on rank 0.

1 process and N processes give the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli import distributed
from carso_cli.errors import CarsoError
from carso_cli.evaluation.adaptive import ATTACKS, adaptive_summary, flag_key
from carso_cli.evaluation.autoattack import AUTOATTACK_LOG, library_logging
from carso_cli.evaluation.batch import Autocast, evaluate_batch, load_examples
from carso_cli.evaluation.cost import expected_calls
from carso_cli.evaluation.indicators import indicators_summary
from carso_cli.evaluation.perclass import per_class_section
from carso_cli.evaluation.report import library_versions, merge_records, summarize
from carso_cli.evaluation.saturation import saturation_summary
from carso_cli.evaluation.settings import EvalSettings, batch_ranges
from carso_cli.evaluation.store import (
    RESULTS_FILE,
    RESULTS_FORMAT,
    ResultsStore,
    dumps_compact,
)
from carso_cli.models.carso import CARSO


def adversarial_path(store: ResultsStore, k: int) -> Path:
    """Where batch ``k``'s adversarial examples are kept (``--save-adversarial``)."""
    return store.batch_path(k).with_suffix(".adversarial.safetensors")


def collect_adversarial(store: ResultsStore, results: dict[str, Any]) -> dict[str, Any]:
    """The whole evaluation's adversarial examples, labels, test-set indices and per-attack flags.

    Returns ``save_adversarial``'s arguments: y, idx and attack → (x_adv, flags), the flags being the
    results' per-example flags of the same key (robust: 1/True).
    """
    parts = []
    for k in range(results["batches"]):
        path = adversarial_path(store, k)
        if not path.is_file():
            raise CarsoError(
                f"the adversarial examples of batch {k} were not kept (that batch was computed without "
                "--save-adversarial): rerun with another --name"
            )
        parts.append(ckpt.load_tensors(path)[0])
    names = [n for n in parts[0] if n != "y" and n in results["flags"]]
    flags = results["flags"]
    attacks = {n: (torch.cat([p[n] for p in parts]), torch.tensor([f == 1 for f in flags[n]])) for n in names}
    n = sum(p["y"].shape[0] for p in parts)
    return {"y": torch.cat([p["y"] for p in parts]), "idx": torch.arange(n), "attacks": attacks}


class DatasetAttacks:
    """The default attack source: batch ``rng`` is the dataset's examples, attacked as ``settings.attack``
    says (``evaluate_batch``); Table 2's columns. ``carso_cli.adversarial.FileSource`` is the other one."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def examples(self, rng: range) -> tuple[torch.Tensor, torch.Tensor]:
        return load_examples(self.dataset, rng)

    def flags(
        self,
        classifier: nn.Module,
        carso: nn.Module | None,
        x: torch.Tensor,
        y: torch.Tensor,
        rng: range,
        s: EvalSettings,
        device: torch.device,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return evaluate_batch(classifier, carso, x, y, rng, s, device, **kwargs)

    def summarize(self, flags: dict[str, list[Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        return summarize(flags)


@dataclass
class EvalOutcome:
    results: dict[str, Any] | None  # the results file's content (main process), else None
    path: Path | None
    computed: int  # batches computed by this process
    resumed: int  # batches found on disk by this process


def evaluate(
    classifier: nn.Module,
    carso: CARSO | None,
    dataset: Any,
    settings: EvalSettings,
    store: ResultsStore,
    ctx: distributed.DistContext,
    *,
    run: Path | None = None,
    progress: Any = None,
    console: Any = None,
    extra: dict[str, Any] | None = None,
    keep_adversarial: bool = False,
    estimate_s: float | None = None,
    source: Any = None,
) -> EvalOutcome:
    """Evaluate the first ``settings.n_examples`` examples of ``dataset``; rank 0 writes the results.

    Every process takes a contiguous range of whole batches; finished batches are skipped with
    ``store.resume``. ``progress`` (a rich Progress, main process) gets an example-level task and a
    per-batch task counting forward passes. ``keep_adversarial``: each batch's adversarial examples are
    kept beside its flags (``adversarial_path``), for ``--save-adversarial``. ``estimate_s``: the cost
    estimate, the whole-evaluation ETA until the first computed batch re-calibrates it (``_deadline``).
    pyautoattack's log goes to ``RUN/eval/NAME/autoattack.log`` (its warnings to the console too).
    ``source``: where each batch's examples and flags come from (default ``DatasetAttacks(dataset)``).
    """
    s = settings
    s.validate()
    source = source or DatasetAttacks(dataset)
    store.check()
    if ctx.is_main:
        store.prepare()
    distributed.barrier(ctx)
    started = time.time()
    batches = batch_ranges(s.n_examples, s.batch_size)
    mine = distributed.shard(len(batches), ctx.rank, ctx.world_size)
    model = Autocast(carso, ctx.device) if carso is not None and s.precision == "bfloat16" else carso
    shown = _Shown(progress, sum(len(batches[k]) for k in mine), estimate_s)
    records: list[dict[str, Any]] = []
    computed = resumed = 0
    log_path = store.dir / AUTOATTACK_LOG if ctx.is_main else None
    batch_seconds: list[tuple[float, int]] = []  # (seconds without the indicators, examples) per computed batch
    with library_logging(console if ctx.is_main else None, log_path=log_path) as log_counts:
        for k in mine:
            rng = batches[k]
            record = store.load(k)
            if record is None:
                tick = shown.batch(f"batch {k + 1}/{len(batches)} — forward passes", expected_calls(s))
                record = _compute_batch(k, rng, source, classifier, model, s, store, ctx, tick, keep_adversarial)
                computed += 1
                indicator_s = (record["flags"].get("indicators") or {}).get("wall_s", 0.0)
                batch_seconds.append((record["wall_s"] - indicator_s, len(rng)))
            else:
                resumed += 1
            records.append(record)
            shown.done(len(rng), sum(len(batches[j]) for j in mine[mine.index(k) + 1 :]), batch_seconds)
    shown.close()
    outcome = EvalOutcome(None, None, computed, resumed)
    results_of = lambda every: _results(every, source, s, store, ctx, run, dataset, log_counts, started, extra)  # noqa: E731
    return _gather(records, outcome, store, ctx, results_of)


def _gather(
    records: list[dict[str, Any]],
    outcome: EvalOutcome,
    store: ResultsStore,
    ctx: distributed.DistContext,
    results_of: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> EvalOutcome:
    """Every process's records to rank 0, which writes the results file (``results_of(every record)``)."""
    gathered = distributed.gather_objects(records, ctx)
    if not ctx.is_main or gathered is None:
        return outcome
    results = results_of([r for part in gathered for r in part])
    path = store.dir / RESULTS_FILE
    ckpt.atomic_write_text(path, dumps_compact(results))
    return EvalOutcome(results, path, outcome.computed, outcome.resumed)


def _compute_batch(
    k: int,
    rng: range,
    source: Any,
    classifier: nn.Module,
    model: nn.Module | None,
    s: EvalSettings,
    store: ResultsStore,
    ctx: distributed.DistContext,
    tick: Any,
    keep_adversarial: bool,
) -> dict[str, Any]:
    """Batch ``k``'s record (its flags, labels and wall time), saved in ``store`` (and its adversarial examples)."""
    x, y = source.examples(rng)
    x, y = x.to(ctx.device), y.to(ctx.device)
    t0 = time.time()
    adversarial: dict[str, torch.Tensor] | None = {} if keep_adversarial else None
    flags = source.flags(classifier, model, x, y, rng, s, ctx.device, on_call=tick, adversarial=adversarial)
    if adversarial:
        ckpt.save_tensors(adversarial_path(store, k), {"y": y.cpu(), **adversarial})
    record = {
        "batch": k,
        "start": rng.start,
        "stop": rng.stop,
        "settings": store.settings,
        "flags": flags,
        "labels": y.tolist(),
        "wall_s": round(time.time() - t0, 3),
        "rank": ctx.rank,
    }
    store.save(k, record)
    return record


def _results(
    all_records: list[dict[str, Any]],
    source: Any,
    s: EvalSettings,
    store: ResultsStore,
    ctx: distributed.DistContext,
    run: Path | None,
    dataset: Any,
    log_counts: dict[str, int],
    started: float,
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """The results file's content from every process's batch records."""
    flags = merge_records(all_records)
    metrics, report = source.summarize(flags)
    warnings = sorted({w for r in all_records for w in r["flags"].get("warnings", [])})
    return {
        "format": RESULTS_FORMAT,
        "name": store.dir.name,
        "run": str(run) if run is not None else None,
        "settings": store.settings,
        "seed": s.seed,
        "n_examples": s.n_examples,
        "batches": len(batch_ranges(s.n_examples, s.batch_size)),
        "metrics": metrics,
        "reclassification": report,
        "adaptive": adaptive_summary(flags, _wall_per_attack(all_records)),
        "saturation": saturation_summary(flags, s.saturation_threshold),
        "per_class": per_class_section(all_records, flags, run, dataset),
        "indicators": indicators_summary(
            [r["flags"].get("indicators") for r in all_records],
            {a: flags[flag_key(a)] for a in ATTACKS if flag_key(a) in flags},
            sum(_wall_per_attack(all_records).values()),
            s.indicator_examples,
        ),
        "flags": flags,
        "library_warnings": warnings,
        "autoattack_log": {"file": AUTOATTACK_LOG, **log_counts} if log_counts["lines"] else None,
        "wall_time_s": round(sum(r["wall_s"] for r in all_records), 3),
        "elapsed_s": round(time.time() - started, 3),
        "processes": ctx.world_size,
        "device": str(ctx.device),
        "versions": library_versions(),
        "notes": [
            "A robust flag is set only when the clean flag (same model, single draw) is set too.",
            (
                "CARSO's clean, re-classification and PGD+EoT draws are seeded per example (independent of "
                "batching and processes); AutoAttack's internal randomness is seeded per batch, so its "
                "results depend on the batch size but not on the number of processes."
            ),
            "reclassification.*.worst: robust only if the single draw and all repeats are right.",
            (
                "adaptive: an example is robust only if it survives every attack (each judged by the single "
                "draw and all repeats); attacks skip examples already broken, so each attack's 'broken_first' "
                "counts the examples it broke first and 'robust_after' the survivors of it and all before it."
            ),
        ],
        **(extra or {}),
    }


class _Shown:
    """The runner's two progress tasks (no-ops without a display): the examples, with an ETA (the cost estimate
    until the first computed batch re-calibrates it, ``_deadline``), and the forward passes of the batch."""

    def __init__(self, progress: Any, examples: int, estimate_s: float | None) -> None:
        self.progress = progress
        if progress is not None:
            deadline = time.monotonic() + estimate_s if estimate_s is not None else None
            self.task = progress.add_task("evaluation: examples", total=examples, deadline=deadline)
            self.calls = progress.add_task("forward passes", total=None, visible=False)

    def batch(self, description: str, calls: int | None) -> Any:
        """A batch starts: its forward-pass counter reset; returns the tick each forward pass calls (or None)."""
        if self.progress is None:
            return None
        self.progress.reset(self.calls, total=calls, visible=True, description=description)
        return lambda: self.progress.advance(self.calls)

    def done(self, examples: int, left: int, batch_seconds: list[tuple[float, int]]) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, examples)
            previous = self.progress.tasks[self.task].fields["deadline"]
            self.progress.update(self.task, deadline=_deadline(batch_seconds, left, previous))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.update(self.calls, visible=False)


def _deadline(batch_seconds: list[tuple[float, int]], examples_left: int, previous: float | None) -> float | None:
    """The predicted finish (``time.monotonic()``): the finished batches' seconds per example × the examples
    left — without the indicators, which run once, on the first batch only; the previous one when none."""
    if not batch_seconds:
        return previous
    per_example = sum(t for t, _ in batch_seconds) / sum(n for _, n in batch_seconds)
    return time.monotonic() + per_example * examples_left


def _wall_per_attack(records: list[dict[str, Any]]) -> dict[str, float]:
    wall: dict[str, float] = {}
    for r in records:
        for name, seconds in (r["flags"].get("adaptive_wall_s") or {}).items():
            wall[name] = wall.get(name, 0.0) + seconds
    return wall
