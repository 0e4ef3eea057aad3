"""The attacks on stochastic purification of issue 20, each with ``adaptive.run_candidates``' shape.

``run_stochastic(name, model, classifier, x, y, idx, s, device) → Candidates`` (one point per
sub-attack, no verdict): the points are judged afterwards by the model as evaluated
(``adaptive.judge_candidates``), as every adaptive attack's. In the order cheap to dear (CARSO
forward+backward passes per example with the paper's budgets: 100 APGD steps, 20 EoT, 200 PGD steps,
5000 Square queries, ``N_TARGETS`` = 3):

1. ``representation`` — PGD on the classifier's representation as the purifier consumes it (the
   condition encoder's input and its code c): away from the clean input's, and towards that of an
   example of the class APGD-T would target. Deterministic: no draws, no aggregation; classifier passes
   only, 4 × 201 (``representation_attack``).
2. ``fixed-randomness`` — APGD-CE, APGD-T, FAB-T (and Square with ``--square``, as the adaptive
   evaluation's own Square) on CARSO with z held fixed (z = 0, then one seeded draw: common random
   numbers), judged on fresh draws; no EoT: 2 × 700 passes (and 2 × 5000 forwards) (``fixed_randomness``).
3. ``selective-eot`` — DiffHammer's selective EoT: ascend the draws already fooled or closest to it;
   201 × 20 forwards and at most as many passes (``selective_eot``).
4. ``apgd-t-eot`` — the library's APGD-T with EoT on ``dexp-logsum``, one run per target class,
   3 × 100 × 20 passes (``targeted_eot``).
5. ``pgd-cw-eot`` — PGD+EoT on the CW margin towards each target class, on ``dexp-logsum``,
   3 × 201 × 20 passes (``targeted_eot``).

Budgets come from ``EvalSettings``: the APGD/FAB steps and EoT of randAA (``aa_steps``, ``aa_eot``),
PGD+EoT's (``pgd_steps``, ``pgd_step_size``, ``pgd_eot``), Square's queries; the number of target
classes is ``ascent.N_TARGETS``.
"""

from __future__ import annotations

import torch
from torch import nn

from carso_cli.evaluation.candidates import Candidates
from carso_cli.evaluation.fixed_randomness import COMPONENTS, fixed_randomness_points
from carso_cli.evaluation.representation_attack import representation_points
from carso_cli.evaluation.saturation import LOGSUM_SURFACE, surface
from carso_cli.evaluation.seeding import example_seed
from carso_cli.evaluation.selective_eot import selective_eot_points
from carso_cli.evaluation.settings import EvalSettings
from carso_cli.evaluation.targeted_eot import apgd_t_eot_points, pgd_cw_eot_points

ATTACKS = ("representation", "fixed-randomness", "selective-eot", "apgd-t-eot", "pgd-cw-eot")
TITLES = {
    "representation": "representation: away / towards another class",
    "fixed-randomness": "AutoAttack with z fixed (z = 0, common draws)",
    "selective-eot": "selective EoT (DiffHammer) on the draws",
    "apgd-t-eot": "APGD-T (EoT) on dexp-logsum",
    "pgd-cw-eot": "PGD+EoT, CW margin, targeted, on dexp-logsum",
}


def run_stochastic(
    name: str,
    model: nn.Module,
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: list[int],
    s: EvalSettings,
    device: torch.device,
) -> Candidates:
    """Every adversarial point of the attack ``name`` on the examples ``idx`` (no verdict).

    ``model`` is the CARSO to attack (its own aggregation; the attacks pick their surfaces), ``classifier``
    the classifier alone (unused: the representation attack reads CARSO's own classifier).
    """
    seed = example_seed(s.seed, name, idx[0], bits=31)
    if name == "representation":
        points, sources = representation_points(model, x, y, idx, s)
    elif name == "apgd-t-eot":
        with surface(model, LOGSUM_SURFACE):
            points, sources = apgd_t_eot_points(
                model, x, y, eps=s.eps, seed=seed, device=device, steps=s.aa_steps, eot=s.aa_eot
            )
    elif name == "pgd-cw-eot":
        with surface(model, LOGSUM_SURFACE):
            points, sources = pgd_cw_eot_points(
                model,
                x,
                y,
                idx,
                eps=s.eps,
                steps=s.pgd_steps,
                step_size=s.pgd_step_size,
                eot=s.pgd_eot,
                seed=s.seed,
                normalise=bool(s.eot_normalise),
            )
    elif name == "selective-eot":
        points, sources = selective_eot_points(
            model, x, y, idx, eps=s.eps, steps=s.pgd_steps, step_size=s.pgd_step_size, eot=s.pgd_eot, seed=s.seed
        )
    elif name == "fixed-randomness":
        # Square, the dear black-box component, follows --square as the adaptive evaluation's own Square.
        components = [c for c in COMPONENTS if c != "square" or s.square]
        points, sources = fixed_randomness_points(
            model,
            x,
            y,
            eps=s.eps,
            seed=seed,
            device=device,
            steps=s.aa_steps,
            square_queries=s.square_queries,
            components=components,
        )
    else:
        raise ValueError(f"unknown attack '{name}' (choose from {', '.join(ATTACKS)})")
    return Candidates(points.to(x.device, x.dtype), sources)
