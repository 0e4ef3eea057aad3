"""The representation attack: move what the purifier is conditioned on, not CARSO's output (issue 20).

CARSO's only path from the input to the decoder is the classifier's representation (section 4.1): the
hooked layers' outputs, which the condition encoder turns into the code c. Pushing them far from the
clean input's (``away``), or towards those of an example of another class (``toward``), needs no
gradient through the latent draws, the decoder, the final classifier or the aggregation: it is
deterministic and stays informative where the end-to-end gradient is masked (a saturated aggregation,
a quantised or non-differentiable decision). Two spaces: ``representation`` (the condition encoder's
input) and ``code`` (its output c, what the decoder reads). The candidates are judged afterwards by the
model as evaluated, like every other attack's.

The distance is the sum over layers of ‖r_l(x') − r_l(ref)‖² / ‖r_l(ref)‖²: relative per layer, so
that a wide early layer does not drown a narrow late one. The target class is the one APGD-T would
try first (the classifier's highest non-true logit, then the next, …, ``N_TARGETS`` of them); its
example is the one of that class, among ``pool`` (default: the attacked examples themselves), whose
representation is nearest; where the pool holds none of the target classes, the nearest example of any
other class. An example with no other class in the pool keeps its input as its ``toward`` candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from carso_cli.evaluation.ascent import N_TARGETS, sign_ascent, top_targets
from carso_cli.evaluation.gradients import start_noise
from carso_cli.evaluation.seeding import find_carso, through_wrappers
from carso_cli.evaluation.settings import EvalSettings
from carso_cli.models.representation import forward_with_representation

SPACES = ("representation", "code")
DIRECTIONS = ("away", "toward")


def features(model: nn.Module, x: torch.Tensor, space: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the classifier's logits (B, C), the features the purifier is conditioned on, one (B, …) per layer).

    ``space``: "representation" (the hooked layers' outputs, the condition encoder's input) or "code"
    (the condition encoder's output c, (B, fcrepr)).
    """
    carso = find_carso(model)
    if carso is None:
        raise ValueError("the representation attack needs a CARSO model")
    logits, rep = forward_with_representation(carso.classifier, carso.layers, x, keep_graph=True)
    if space == "code":
        return logits, [carso.purifier.condition_encoder(rep)]
    if space != "representation":
        raise ValueError(f"unknown space '{space}' (choose from {', '.join(SPACES)})")
    return logits, rep


def distance(feats: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_l ‖f_l − ref_l‖² / ‖ref_l‖² per example. Lists of (B, …) tensors → (B,)."""
    total = torch.zeros(feats[0].shape[0], dtype=torch.float64, device=feats[0].device)
    for f, r in zip(feats, ref):
        f, r = f.flatten(1).double(), r.detach().flatten(1).double()
        total = total + (f - r).pow(2).sum(dim=1) / r.pow(2).sum(dim=1).clamp_min(1e-12)
    return total


def _objective(
    model: nn.Module, ref: list[torch.Tensor], space: str, sign: float, tick: Callable[[], None] = lambda: None
):
    def objective(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            value = sign * distance(features(model, x_adv, space)[1], ref)
            (grad,) = torch.autograd.grad(value.sum(), x_adv)
        tick()
        return value.detach(), grad.detach()

    return objective


def target_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    pool: tuple[torch.Tensor, torch.Tensor],
    space: str,
    k: int = N_TARGETS,
) -> torch.Tensor:
    """Per example the pool row to move towards (B,): the nearest example of the first target class the pool
    holds, else (CIFAR-100, TinyImageNet: a batch holds few of the classes) the nearest of any other class;
    −1 where the pool holds no other class at all."""
    px, py = pool
    with torch.no_grad():
        logits, feats = features(model, x, space)
        pool_feats = feats if px is x else features(model, px, space)[1]
    targets = top_targets(logits, y, k)  # (k, B)
    flat = torch.cat([f.flatten(1) for f in feats], dim=1).double()
    pool_flat = torch.cat([f.flatten(1) for f in pool_feats], dim=1).double()
    nearest = torch.cdist(flat, pool_flat)  # (B, P)
    rows = torch.full((x.shape[0],), -1, dtype=torch.long)
    for i in range(x.shape[0]):
        for t in targets[:, i]:
            same = (py.to(t.device) == t).nonzero().flatten()
            if same.numel():
                rows[i] = same[nearest[i, same.to(nearest.device)].argmin()]
                break
        else:
            other = (py.to(y.device) != y[i]).nonzero().flatten()
            if other.numel():
                rows[i] = other[nearest[i, other.to(nearest.device)].argmin()]
    return rows


def representation_points(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: Sequence[int],
    s: EvalSettings,
    *,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    spaces: Sequence[str] = SPACES,
) -> tuple[torch.Tensor, list[str]]:
    """Candidates (K, B, C, H, W) and their sources "SPACE-DIRECTION": PGD (``s.pgd_steps`` of
    ``s.pgd_step_size``) on the representation distance. ``away`` starts from a seeded random point in
    the ball (the squared distance has zero gradient at x), ``toward`` from x."""
    with through_wrappers(model) as tick:  # the wrappers' precision and progress, bypassed by ``features``
        return _representation_points(model, x, y, idx, s, pool, spaces, tick)


def _representation_points(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: Sequence[int],
    s: EvalSettings,
    pool: tuple[torch.Tensor, torch.Tensor] | None,
    spaces: Sequence[str],
    tick: Callable[[], None],
) -> tuple[torch.Tensor, list[str]]:
    x = x.detach()
    pool = (x, y) if pool is None else pool
    points, sources = [], []
    for space in spaces:
        with torch.no_grad():
            clean = [f.detach() for f in features(model, x, space)[1]]
        start = torch.clamp(x + (2 * start_noise(x, idx, s.seed, 0) - 1) * s.eps, 0.0, 1.0)
        away, _ = sign_ascent(
            _objective(model, clean, space, 1.0, tick),
            x,
            eps=s.eps,
            steps=s.pgd_steps,
            step_size=s.pgd_step_size,
            start=start,
        )
        points.append(away)
        sources.append(f"{space}-away")
        rows = target_examples(model, x, y, pool, space)
        toward = x.clone()
        have = (rows >= 0).nonzero().flatten()
        if have.numel():
            with torch.no_grad():
                ref = [f.detach() for f in features(model, pool[0][rows[have]], space)[1]]
            moved, _ = sign_ascent(
                _objective(model, ref, space, -1.0, tick),
                x[have],
                eps=s.eps,
                steps=s.pgd_steps,
                step_size=s.pgd_step_size,
            )
            toward[have] = moved
        points.append(toward)
        sources.append(f"{space}-toward")
    return torch.stack(points), sources
