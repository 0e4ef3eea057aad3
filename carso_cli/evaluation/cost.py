"""Cost estimate: forward passes per batch and a rough wall time (a warning before a run that would take days)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from carso_cli.evaluation.ascent import N_TARGETS
from carso_cli.evaluation.gradients import input_gradient
from carso_cli.evaluation.settings import EvalSettings

# A re-classification is a forward only: about a third of a forward+backward.
RECLASSIFY_PASSES = 2 / 3
# Candidate points per example of each adaptive attack (one per sub-attack, target, space or component).
CANDIDATES = {
    "randaa": 2,
    "randaa-logsum": 2,
    "pgd-eot-logsum": 1,
    "transfer-classifier": 2,
    "transfer-logit": 2,
    "representation": 4,
    "fixed-randomness": 8,
    "selective-eot": 1,
    "apgd-t-eot": N_TARGETS,
    "pgd-cw-eot": N_TARGETS,
    "square": 1,
}


def adaptive_passes(name: str, s: EvalSettings) -> tuple[float, float]:
    """(CARSO forward+backward passes, classifier passes) per attacked example of one adaptive attack,
    the judging of its candidates included (one draw and ``repeats`` re-classifications each).

    Upper bounds with the settings' budgets (as if no step stopped early). APGD: a clean pass, (steps + 1)
    EoT-averaged gradients and a final pass per run; PGD: steps + 1 gradients; a forward without gradient
    (Square's queries, selective EoT's draw margins, the judging) counts a third of a pass. ``N_TARGETS``
    target classes.
    """
    apgd = 2 + s.aa_eot * (s.aa_steps + 1)  # one APGD run with EoT
    pgd = (s.pgd_steps + 1) * s.pgd_eot  # one PGD+EoT run
    fixed = (s.aa_steps + 2) * (1 + N_TARGETS) + 2 * N_TARGETS * s.aa_steps  # no EoT
    fixed += s.square_queries / 3 if s.square else 0.0
    passes = {
        "randaa": (2 * apgd, 0.0),
        "randaa-logsum": (2 * apgd, 0.0),
        "pgd-eot-logsum": ((s.restarts or 1) * pgd, 0.0),
        "transfer-classifier": (0.0, 2 * (s.aa_steps + 2)),
        "transfer-logit": (2 * apgd, 0.0),
        "representation": (0.0, 2 * 2 * (s.pgd_steps + 1)),  # two spaces, away and toward: classifier only
        "fixed-randomness": (2 * fixed, 0.0),  # z = 0 and common draws
        "selective-eot": (pgd + pgd / 3, 0.0),  # the draws' margins, then the selected draws' gradients
        "apgd-t-eot": (N_TARGETS * apgd, 0.0),
        "pgd-cw-eot": (N_TARGETS * pgd, 0.0),
        "square": (s.square_queries / 3, 0.0),
    }
    carso, classifier = passes[name]
    return carso + CANDIDATES[name] * (1 + s.repeats) * RECLASSIFY_PASSES / 2, classifier


def expected_calls(s: EvalSettings) -> int | None:
    """Forward passes ``evaluate_batch`` makes through the attacked models (None when unknown).

    randAA: the library's clean pass and two checks, then per APGD run one clean pass, (steps + 1)
    EoT-averaged gradients and a final pass (an upper bound: APGD-DLR is skipped when nothing is left).
    The standard version's count depends on how many examples each attack leaves: unknown.
    """
    total = 0
    if "classifier" in s.targets:
        if s.attack == "autoattack" or s.is_adaptive:
            return None
        total += s.pgd_steps if s.attack == "pgd-eot" else 0
    if "carso" in s.targets:
        randaa = 3 + 2 * (2 + s.aa_eot * (s.aa_steps + 1))
        if s.attack == "autoattack":
            total += randaa
        elif s.is_adaptive:
            # An upper bound: every attack on every example (its candidates' judging included), then the
            # clean draws and the saturation checks; later attacks only see the examples still robust.
            total += int(sum(sum(adaptive_passes(a, s)) for a in s.adaptive_attacks)) + 2 * (s.repeats + 1) * 4
        elif s.attack == "pgd-eot":
            total += s.pgd_steps * s.pgd_eot
    return total or None


def passes_per_example(s: EvalSettings, num_classes: int) -> tuple[float, float]:
    """(CARSO, classifier) forward+backward passes per example — an upper bound for AutoAttack."""
    carso = classifier = 0.0
    if "carso" in s.targets:
        if s.attack == "autoattack":
            carso = 2 * (s.aa_eot * (s.aa_steps + 1) + 2)  # APGD-CE and APGD-DLR
        elif s.is_adaptive:  # an upper bound: as if no attack broke anything
            for name in s.adaptive_attacks:
                on_carso, on_classifier = adaptive_passes(name, s)
                carso += on_carso
                classifier += on_classifier
        elif s.attack == "pgd-eot":
            carso = s.pgd_steps * s.pgd_eot
        carso += RECLASSIFY_PASSES * s.repeats  # re-classification: forwards only
    if "classifier" in s.targets:
        targets = min(9, num_classes - 1)
        if s.attack == "autoattack" or s.is_adaptive:
            # APGD-CE, APGD-T (9 targets), FAB-T (9 targets, ~2 passes a step), Square (forwards).
            classifier += (s.aa_steps + 2) * (1 + targets + 2 * targets) + s.square_queries / 3
        elif s.attack == "pgd-eot":
            classifier += s.pgd_steps
    return carso, classifier


def indicator_passes(s: EvalSettings, carso_passes: float) -> float:
    """CARSO forward+backward passes per indicator example (``--attack adaptive``'s attack-failure indicators).

    Each attack runs again at ε = 0.5 (about its own cost) and, on its survivors, with twice the steps and
    EoT (up to 4× its cost; few survive), plus a few single-draw gradients and the re-classifications:
    about 1.5× the adaptive attacks' passes, an estimate calibrated on the CPU (BENCHMARKS.md).
    """
    if not (s.is_adaptive and s.indicators and "carso" in s.targets):
        return 0.0
    return 1.5 * carso_passes


def probe_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds for one forward+backward of ``model`` on ``x`` (after one warm-up)."""
    for _i in range(2):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        input_gradient(model, x, y)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        dt = time.perf_counter() - t0
    return dt


def clean_fractions(
    classifier: nn.Module, carso: nn.Module | None, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """(CARSO's, the classifier's) fraction of ``x`` classified right, one draw: the share of examples the
    attacks will run on (a misclassified example is not attacked), e.g. 10/32 on the demo's tiny model."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the evaluation's draws stay as they were
        right_classifier = (classifier(x).argmax(-1) == y).float().mean().item()
        right_carso = (carso(x).argmax(-1) == y).float().mean().item() if carso is not None else 1.0
    return right_carso, right_classifier


def attacked_passes(s: EvalSettings, num_classes: int, attacked: tuple[float, float]) -> tuple[float, float]:
    """``passes_per_example`` when the attacks run on a share ``attacked`` (CARSO's, the classifier's) of
    the examples; CARSO's re-classifications run on every example."""
    n_carso, n_classifier = passes_per_example(s, num_classes)
    reclassify = RECLASSIFY_PASSES * s.repeats if "carso" in s.targets else 0.0
    return reclassify + (n_carso - reclassify) * attacked[0], n_classifier * attacked[1]


def estimate_seconds(
    classifier: nn.Module,
    carso: nn.Module | None,
    x: torch.Tensor,
    y: torch.Tensor,
    s: EvalSettings,
    num_classes: int,
    world_size: int = 1,
    attacked: tuple[float, float] = (1.0, 1.0),
) -> float:
    """A rough wall-time estimate of the whole evaluation, from timing one pass on ``x``.

    ``attacked``: (CARSO's, the classifier's) share of examples the attacks run on (``clean_fractions``);
    the attack passes scale with it, the re-classifications of CARSO do not.
    """
    n_carso, n_classifier = attacked_passes(s, num_classes, attacked)
    per_carso = probe_seconds(carso, x, y) / x.shape[0] if carso is not None and n_carso else 0.0
    per_classifier = probe_seconds(classifier, x, y) / x.shape[0] if n_classifier else 0.0
    indicators = min(s.indicator_examples, s.n_examples) * indicator_passes(s, n_carso) * per_carso
    return (s.n_examples * (n_carso * per_carso + n_classifier * per_classifier) + indicators) / max(world_size, 1)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
