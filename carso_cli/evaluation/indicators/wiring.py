"""Wiring: every indicator of every attack of one adaptive batch (``batch_indicators``), and their summary
over batches (``indicators_summary``, results.json's ``indicators``)."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from carso_cli.evaluation import adaptive
from carso_cli.evaluation.indicators.measures import (
    GRADIENT_SURFACES,
    INDICATOR_TYPES,
    PGD_EOT,
    UNBOUNDED_EPS,
    AttackFn,
    _Indicator,
    eot_noise,
    judge_reproduction,
    non_convergence,
    transfer_beats_whitebox,
    unbounded_attack,
)
from carso_cli.evaluation.saturation import paper_surface, surface
from carso_cli.evaluation.settings import EvalSettings


def unbounded_settings(s: EvalSettings, eps: float = UNBOUNDED_EPS) -> EvalSettings:
    """Large ε, reduced budget: ≤ 10 steps, ≤ 5 EoT, ≤ 500 queries; PGD steps of 2.5 ε / steps (Madry)."""
    steps = min(s.pgd_steps, 10)
    return dataclasses.replace(
        s,
        eps=eps,
        aa_steps=min(s.aa_steps, 10),
        aa_eot=min(s.aa_eot, 5),
        pgd_steps=steps,
        pgd_eot=min(s.pgd_eot, 5),
        pgd_step_size=2.5 * eps / steps,
        square_queries=min(s.square_queries, 500),
    )


def doubled_settings(s: EvalSettings) -> EvalSettings:
    """2× steps and 2× EoT (and 2× Square queries)."""
    return dataclasses.replace(
        s,
        aa_steps=2 * s.aa_steps,
        aa_eot=2 * s.aa_eot,
        pgd_steps=2 * s.pgd_steps,
        pgd_eot=2 * s.pgd_eot,
        square_queries=2 * s.square_queries,
    )


def attack_fn(name: str, model: nn.Module, classifier: nn.Module, s: EvalSettings, device: torch.device) -> AttackFn:
    """The adaptive evaluation's attack ``name`` with the settings ``s``, as (x, y, indices) → points."""

    def attack(x: torch.Tensor, y: torch.Tensor, indices: list[int]) -> torch.Tensor:
        # Through the module attribute: the adaptive evaluation's attack, exactly (a test may replace it).
        return adaptive.run_candidates(name, model, classifier, x, y, indices, s, device).points

    return attack


def batch_indicators(batch: adaptive.AttackedBatch, result: Any) -> dict[str, Any]:
    """Every indicator but ``transfer`` for every attack of the batch's ``AdaptiveResult``; JSON (raw counts).

    As in ``adaptive_attack``, the batch's ``model`` is attacked and its ``judge`` decides; the subset is
    the clean-correct examples among the evaluation's first ``s.indicator_examples``.
    """
    t0 = time.time()
    s = batch.s
    idx = [int(i) for i in batch.indices]
    at = [r for r, i in enumerate(idx) if i < s.indicator_examples and bool(batch.clean[r])]
    rows = torch.tensor(at, dtype=torch.long)
    b = _Subset(
        batch, idx, rows, batch.x[rows.to(batch.x.device)], batch.y[rows.to(batch.y.device)], [idx[r] for r in at]
    )
    out: dict[str, dict[str, Any]] = {}
    cost = dict.fromkeys(INDICATOR_TYPES, 0.0)  # seconds per indicator, over the attacks

    def timed(key: str, fn: Callable[..., _Indicator], *args: Any, **kwargs: Any) -> _Indicator:
        t = time.time()
        value = fn(*args, seed=s.seed, **kwargs)
        cost[key] += time.time() - t
        return value

    for a in result.attacks:
        out[a.name] = {k: asdict(v) for k, v in _attack_indicators(a, timed, b).items()}
    return {
        "attacks": out,
        "wall_s": round(time.time() - t0, 3),
        "cost_s": {k: round(v, 3) for k, v in cost.items() if k != "transfer"},
    }


@dataclasses.dataclass(frozen=True)
class _Subset:
    """The batch as its indicators see it: all of it (``batch``, ``idx``: reproduction judges every example)
    and the subset the other indicators attack again (``xs``, ``ys``, ``sub``: its clean-correct examples
    among the evaluation's first ``s.indicator_examples``, at ``rows`` of the batch)."""

    batch: adaptive.AttackedBatch
    idx: list[int]
    rows: torch.Tensor
    xs: torch.Tensor
    ys: torch.Tensor
    sub: list[int]

    def attack(self, name: str, s: EvalSettings) -> AttackFn:
        """The adaptive evaluation's attack ``name``, again, with other settings ``s``."""
        return attack_fn(name, self.batch.model, self.batch.classifier, s, self.batch.device)


def _attack_indicators(a: Any, timed: Callable[..., _Indicator], b: _Subset) -> dict[str, _Indicator]:
    """The indicators of one attack ``a`` (an ``AttackOutcome``) of ``batch_indicators``, each ``timed``."""
    s, rows, judge = b.batch.s, b.rows, b.batch.judge
    survived = a.flags[rows] == 1
    candidates = a.candidates[:, rows.to(a.candidates.device)]
    unbounded, doubled = b.attack(a.name, unbounded_settings(s)), b.attack(a.name, doubled_settings(s))
    ind: dict[str, _Indicator] = {
        "reproduction": timed(
            "reproduction",
            judge_reproduction,
            judge,
            a.point,
            b.batch.y,
            b.idx,
            a.flags == 0,
            repeats=s.repeats,
            library_flags=a.library_flags,
        ),
        # The attack again at a large ε, and with twice its budget (on the subset).
        "unbounded": timed("unbounded", unbounded_attack, judge, unbounded, b.xs, b.ys, b.sub, repeats=s.repeats),
        "convergence": timed(
            "convergence", non_convergence, judge, doubled, b.xs, candidates, b.ys, b.sub, survived, repeats=s.repeats
        ),
    }
    if a.name in GRADIENT_SURFACES:
        aggregation, losses = GRADIENT_SURFACES[a.name]
        if a.name == "randaa":  # randAA attacks what the paper's protocol attacks (the authors' surface)
            aggregation = paper_surface(s.aggregation)
        eot = s.pgd_eot if a.name in PGD_EOT else s.aa_eot
        with surface(b.batch.model, aggregation) if aggregation else contextlib.nullcontext():
            ind["eot_noise"] = timed("eot_noise", eot_noise, b.batch.model, b.xs, b.ys, b.sub, eot=eot, losses=losses)
    return ind


def indicators_summary(
    parts: Sequence[dict[str, Any] | None], flags: dict[str, list[int]], adaptive_wall_s: float, examples: int
) -> dict[str, Any] | None:
    """results.json's ``indicators`` block from the batches' ``batch_indicators`` and the merged flags.

    ``flags``: attack → per-example flags (for ``transfer``); ``adaptive_wall_s``: the adaptive attacks'
    wall time, the reference of the indicators' relative cost.
    """
    parts = [p for p in parts if p]
    if not parts:
        return None
    merged: dict[str, dict[str, _Indicator]] = {}
    for part in parts:
        for name, ind in part["attacks"].items():
            row = merged.setdefault(name, {})
            for key, raw in ind.items():
                value = INDICATOR_TYPES[key](**raw)
                row[key] = row[key] + value if key in row else value
    for name, t in transfer_beats_whitebox(flags).items():
        merged.setdefault(name, {})["transfer"] = t
    wall = sum(p["wall_s"] for p in parts)
    cost: dict[str, float] = {}
    for p in parts:
        for key, seconds in (p.get("cost_s") or {}).items():
            cost[key] = round(cost.get(key, 0.0) + seconds, 3)
    attacks = {name: {key: row[key].to_json() for key in INDICATOR_TYPES if key in row} for name, row in merged.items()}
    failed = [
        f"{name}: {key}" for name, row in merged.items() for key in INDICATOR_TYPES if key in row and row[key].failed
    ]
    return {
        "attacks": attacks,
        "failed": failed,
        "examples": examples,
        "wall_s": round(wall, 3),
        "cost_s": cost,  # per indicator
        "adaptive_wall_s": round(adaptive_wall_s, 3),
        "relative_cost": wall / adaptive_wall_s if adaptive_wall_s > 0 else None,
        "meaning": "Pintor et al. 2022: a failed indicator means the attack may have failed silently on this "
        "model; its robust examples are then weak evidence (see README, 'Adaptive evaluation')",
    }
