"""The attacks on stochastic purification of issue 20, each with ``adaptive.run_candidates``' shape.

``RUNNERS[name](model, x, y, idx, s, seed, device) → (points (K, B, C, H, W), K sources)``, one point
per sub-attack, run by ``adaptive.run_candidates`` and judged afterwards by the model as evaluated
(``adaptive.judge_candidates``), as every adaptive attack's. In the order cheap to dear (their passes
per example: ``cost.adaptive_passes``):

1. ``representation`` — PGD on the classifier's representation as the purifier consumes it (the
   condition encoder's input and its code c): away from the clean input's, and towards that of an
   example of the class APGD-T would target. Deterministic: no draws, no aggregation; classifier passes
   only (``representation_attack``).
2. ``fixed-randomness`` — APGD-CE, APGD-T, FAB-T (and Square with ``--square``, as the adaptive
   evaluation's own Square) on CARSO with z held fixed (z = 0, then one seeded draw: common random
   numbers), judged on fresh draws; no EoT (``fixed_randomness``).
3. ``selective-eot`` — DiffHammer's selective EoT: ascend the draws already fooled or closest to it;
   the draws' margins, then gradients of the selected draws only (``selective_eot``).
4. ``apgd-t-eot`` — the library's APGD-T with EoT on ``dexp-logsum``, one run per target class
   (``targeted_eot``).
5. ``pgd-cw-eot`` — PGD+EoT on the CW margin towards each target class, on ``dexp-logsum``
   (``targeted_eot``).

Budgets come from ``EvalSettings``: the APGD/FAB steps and EoT of randAA (``aa_steps``, ``aa_eot``),
PGD+EoT's (``pgd_steps``, ``pgd_step_size``, ``pgd_eot``), Square's queries; the number of target
classes is ``ascent.N_TARGETS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from carso_cli.evaluation.fixed_randomness import fixed_randomness_points
from carso_cli.evaluation.representation_attack import representation_points
from carso_cli.evaluation.saturation import LOGSUM_SURFACE, surface
from carso_cli.evaluation.selective_eot import selective_eot_points
from carso_cli.evaluation.settings import EvalSettings
from carso_cli.evaluation.targeted_eot import apgd_t_eot_points, pgd_cw_eot_points

TITLES = {
    "representation": "representation: away / towards another class",
    "fixed-randomness": "AutoAttack with z fixed (z = 0, common draws)",
    "selective-eot": "selective EoT (DiffHammer) on the draws",
    "apgd-t-eot": "APGD-T (EoT) on dexp-logsum",
    "pgd-cw-eot": "PGD+EoT, CW margin, targeted, on dexp-logsum",
}
Points = tuple[torch.Tensor, list[str]]
# (CARSO to attack, x, y, the examples' indices, settings, the attack's seed, device) → points, sources
Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor, list[int], EvalSettings, int, torch.device], Points]


def _on_logsum(model: nn.Module, attack: Callable[[], Points]) -> Points:
    """The targeted attacks attack ``dexp-logsum``: the paper's decision, unsaturated."""
    with surface(model, LOGSUM_SURFACE):
        return attack()


# Looked up at call time (``RUNNERS[name]`` calls the module's functions by name), so a test may replace one.
RUNNERS: dict[str, Runner] = {
    "representation": lambda model, x, y, idx, s, seed, device: representation_points(model, x, y, idx, s),
    "fixed-randomness": lambda model, x, y, idx, s, seed, device: fixed_randomness_points(
        model, x, y, s, seed=seed, device=device
    ),
    "selective-eot": lambda model, x, y, idx, s, seed, device: selective_eot_points(model, x, y, idx, s),
    "apgd-t-eot": lambda model, x, y, idx, s, seed, device: _on_logsum(
        model, lambda: apgd_t_eot_points(model, x, y, s, seed=seed, device=device)
    ),
    "pgd-cw-eot": lambda model, x, y, idx, s, seed, device: _on_logsum(
        model, lambda: pgd_cw_eot_points(model, x, y, idx, s)
    ),
}
ATTACKS = tuple(RUNNERS)
# They read a CARSO's parts (its classifier's representation, its per-draw logits): on any other model
# (the library's ``adaptive_attack`` on a plain stochastic model) they do not run, and say so.
NEEDS_CARSO = ("representation", "selective-eot")
