"""The evaluation of one batch: every per-example flag, for every target and attack."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from carso_cli.evaluation.adaptive import AttackedBatch, adaptive_attack, flag_key
from carso_cli.evaluation.autoattack import autoattack_flags
from carso_cli.evaluation.gradients import pgd_eot_examples
from carso_cli.evaluation.indicators import batch_indicators
from carso_cli.evaluation.saturation import flag_key as saturation_key
from carso_cli.evaluation.saturation import (
    paper_surface,
    saturated_flags,
    surface,
    surfaces_of,
)
from carso_cli.evaluation.seeding import (
    STREAM_ADV,
    STREAM_ADV_REPEATS,
    STREAM_CLEAN,
    STREAM_CLEAN_REPEATS,
    classifier_flags,
    draw_flags,
    example_seed,
)
from carso_cli.evaluation.settings import EvalSettings


class Autocast(nn.Module):
    """Runs a model under bfloat16 autocast (CUDA), returning float32 scores (float64 ones unchanged)."""

    autocast_dtype = torch.bfloat16  # read by ``seeding.through_wrappers`` for attacks that bypass forward

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.device_type = device.type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.autocast_dtype):
            out = self.model(x)
        return out if out.dtype == torch.float64 else out.float()


class CountCalls(nn.Module):
    """Wraps a model and calls ``on_call()`` after every forward (drives progress bars inside attacks)."""

    def __init__(self, model: nn.Module, on_call: Callable[[], None]) -> None:
        super().__init__()
        self.model = model
        self.on_call = on_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.on_call()
        return out


def _flags(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def evaluate_batch(
    classifier: nn.Module,
    carso: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: range,
    settings: EvalSettings,
    device: torch.device,
    on_call: Callable[[], None] | None = None,
    adversarial: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Every flag of one batch. x (B, C, H, W) and y (B,) on ``device``; returns JSON-ready lists.

    Keys (each a list over the batch, or ``repeats`` lists for ``*_repeats``):
    ``classifier_clean``, ``carso_clean``, ``carso_clean_repeats``; with AutoAttack (``autoattack`` and
    ``adaptive``) ``classifier_aa``, ``carso_randaa`` (+ ``carso_randaa_library``, ``carso_randaa_repeats``);
    with PGD+EoT ``classifier_pgd_eot``, ``carso_pgd_eot`` (+ ``carso_pgd_eot_repeats``); with ``adaptive``
    ``carso_adaptive`` (the worst case) and one ``adaptive_<attack>`` list per attack (1/0/-1, see
    ``adaptive``), with ``adaptive_wall_s`` (attack → seconds) and, unless ``settings.indicators`` is off,
    ``indicators`` (``indicators.batch_indicators``); for CARSO ``saturation_<surface>_<point>``.
    A robust flag is set only when the clean flag is too (robust accuracy ≤ clean accuracy by construction).

    ``adversarial``: when a dict is given, it is filled with each attack's adversarial examples (B, C, H, W)
    on the CPU, by flag key (``classifier_aa``, ``carso_randaa``, ``adaptive_<attack>``, ``carso_adaptive``
    — the per-example worst case, …); an example an attack did not change is its input.
    """
    s = settings
    out: dict[str, Any] = {}
    warnings: list[str] = []
    keep = adversarial if adversarial is not None else {}
    tick = on_call or (lambda: None)
    counted_classifier = CountCalls(classifier, tick)
    counted_carso = CountCalls(carso, tick) if carso is not None else None
    idx = list(indices)
    batch = _Batch(x, y, idx, s, device, out, keep)
    if "classifier" in s.targets:
        warnings += _classifier_part(classifier, counted_classifier, batch)
    if "carso" in s.targets and carso is not None and counted_carso is not None:
        warnings += _carso_part(carso, counted_carso, counted_classifier, batch)
    for k, v in keep.items():
        keep[k] = v.detach().cpu()
    out["warnings"] = warnings
    return out


@dataclass
class _Batch:
    """The batch ``evaluate_batch`` works on (x (B, C, H, W), y (B,) on ``device``, test-set indices), its
    settings, and what its parts write: the flags (``out``) and the adversarial examples (``keep``)."""

    x: torch.Tensor
    y: torch.Tensor
    idx: list[int]
    s: EvalSettings
    device: torch.device
    out: dict[str, Any]
    keep: dict[str, torch.Tensor]


def _autoattack(model: nn.Module, b: _Batch, version: str, stream: str, **extra: Any) -> Any:
    """pyautoattack's ``version`` on the batch, seeded per batch by its first example and ``stream``."""
    seed = example_seed(b.s.seed, stream, b.idx[0], bits=31)
    return autoattack_flags(
        model, b.x, b.y, eps=b.s.eps, version=version, seed=seed, device=b.device, steps=b.s.aa_steps, **extra
    )


def _classifier_part(
    classifier: nn.Module,
    counted_classifier: nn.Module,
    b: _Batch,
) -> list[str]:
    """The classifier's flags (into ``out``) and adversarial examples (into ``keep``); returns the warnings."""
    x, y, idx, s, out, keep = b.x, b.y, b.idx, b.s, b.out, b.keep
    warnings: list[str] = []
    clean = classifier_flags(classifier, x, y)
    out["classifier_clean"] = _flags(clean)
    if s.attack == "autoattack" or s.is_adaptive:
        res = _autoattack(counted_classifier, b, "standard", "classifier", square_queries=s.square_queries)
        out["classifier_aa"] = _flags(res.flags & clean)
        keep["classifier_aa"] = res.x_adv.cpu()
        warnings += [f"classifier: {w}" for w in res.warnings]
    elif s.attack == "pgd-eot":
        # The classifier is deterministic: one EoT iteration is the same attack, 20× cheaper.
        x_adv = pgd_eot_examples(
            counted_classifier,
            x,
            y,
            idx,
            eps=s.eps,
            steps=s.pgd_steps,
            step_size=s.pgd_step_size,
            eot=1,
            seed=s.seed,
        )
        out["classifier_pgd_eot"] = _flags(classifier_flags(classifier, x_adv, y) & clean)
        keep["classifier_pgd_eot"] = x_adv.cpu()
    return warnings


def _carso_part(
    carso: nn.Module,
    counted_carso: nn.Module,
    counted_classifier: nn.Module,
    b: _Batch,
) -> list[str]:
    """CARSO's flags (into ``out``) and adversarial examples (into ``keep``); returns the warnings."""
    x, y, idx, s, device, out, keep = b.x, b.y, b.idx, b.s, b.device, b.out, b.keep
    warnings: list[str] = []
    clean_r = draw_flags(carso, x, y, idx, s.seed, STREAM_CLEAN_REPEATS, s.repeats)
    clean = draw_flags(carso, x, y, idx, s.seed, STREAM_CLEAN)[0]
    out["carso_clean"] = _flags(clean)
    out["carso_clean_repeats"] = [_flags(r) for r in clean_r]
    x_adv = x_final = None
    key = ""
    if s.attack == "autoattack":
        # The paper's protocol: randAA on the surface the authors' AutoAttack saw (their float32
        # lexsemble for dexp). The library's z come from the global RNG: not the seeded sampler.
        with surface(counted_carso, paper_surface(s.aggregation)):
            res = _autoattack(counted_carso, b, "rand", "carso", eot=s.aa_eot)
        out["carso_randaa_library"] = _flags(res.flags)
        out["carso_randaa"] = _flags(res.flags & clean)
        x_adv, key = res.candidates, "carso_randaa"
        keep[key] = x_final = res.point
        warnings += [f"carso: {w}" for w in res.warnings]
    elif s.attack == "pgd-eot":
        x_adv = pgd_eot_examples(counted_carso, x, y, idx, **s.pgd_eot_options())
        single = draw_flags(carso, x_adv, y, idx, s.seed, STREAM_ADV)[0]
        out["carso_pgd_eot"] = _flags(single & clean)
        key = "carso_pgd_eot"
        keep[key] = x_final = x_adv
        x_adv = x_adv[None]
    elif s.is_adaptive:
        x_final, more = _adaptive_part(carso, counted_carso, counted_classifier, x, y, idx, clean, s, device, out, keep)
        warnings += more
    _after_attack(carso, x, y, idx, s, x_adv, key, x_final, out)
    return warnings


def _adaptive_part(
    carso: nn.Module,
    counted_carso: nn.Module,
    counted_classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: list[int],
    clean: torch.Tensor,
    s: EvalSettings,
    device: torch.device,
    out: dict[str, Any],
    keep: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, list[str]]:
    """``--attack adaptive`` (or one of its attacks alone) on CARSO: its flags (into ``out``); returns the
    worst-case point and the warnings."""
    warnings: list[str] = []
    batch = AttackedBatch(counted_carso, carso, counted_classifier, x, y, idx, clean, s, device)
    result = adaptive_attack(batch)
    first = result.attacks[0]
    if first.name == "randaa":  # randAA on the paper's surface: Table 2's column, as ``autoattack``
        assert first.library_flags is not None and first.repeats is not None
        out["carso_randaa_library"] = _flags(first.library_flags)
        out["carso_randaa"] = _flags(first.library_flags & clean)
        out["carso_randaa_repeats"] = [_flags(r) for r in first.repeats]
        keep["carso_randaa"] = first.point.cpu()
    for a in result.attacks:
        out[flag_key(a.name)] = _flags(a.flags)
        keep[flag_key(a.name)] = a.point.cpu()
        warnings += [f"carso {a.name}: {w}" for w in a.warnings]
    out["carso_adaptive"] = _flags(result.robust)
    out["adaptive_wall_s"] = {a.name: round(a.wall_s, 3) for a in result.attacks}
    keep["carso_adaptive"] = x_final = result.worst
    if s.indicators:  # attack-failure indicators, on the evaluation's first s.indicator_examples
        out["indicators"] = batch_indicators(batch, result)
    return x_final, warnings


def _after_attack(
    carso: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: list[int],
    s: EvalSettings,
    x_adv: torch.Tensor | None,
    key: str,
    x_final: torch.Tensor | None,
    out: dict[str, Any],
) -> None:
    """CARSO re-classified on the attack's candidates ``x_adv`` (K, B, C, H, W) as ``{key}_repeats``; the
    saturation of each surface at the clean and the final adversarial point ``x_final``."""
    if x_adv is not None:
        # Re-classification: a draw is right only if it is right on every candidate of the attack.
        reps = torch.stack([draw_flags(carso, c, y, idx, s.seed, STREAM_ADV_REPEATS, s.repeats) for c in x_adv]).all(
            dim=0
        )
        out[f"{key}_repeats"] = [_flags(r) for r in reps]
    # Saturation of each surface's CE gradient, at the clean and the final adversarial point.
    points = {"clean": x} if x_final is None else {"clean": x, "adversarial": x_final}
    for name in surfaces_of(s.aggregation):
        with surface(carso, name):
            for point, xp in points.items():
                out[saturation_key(name, point)] = _flags(saturated_flags(carso, xp, y, idx, seed=s.seed))


def load_examples(dataset: Any, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``dataset[i]`` for i in ``indices`` → x (B, C, H, W) float32, y (B,) int64."""
    xs, ys = [], []
    for i in indices:
        x, y = dataset[i]
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(int(y))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)
