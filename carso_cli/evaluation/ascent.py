"""Pieces shared by the attacks on stochastic purification (issue 20): margins, targets, sign ascent.

``sign_ascent`` is ℓ∞ PGD on any per-example objective (the representation distance, a CW margin
averaged over draws, DiffHammer's selective margin): sign steps, projection onto the ε-ball and
[0, 1], and the best iterate by the objective. carso's ``attacks.pgd_eot`` is cross-entropy only;
these objectives are not, so the loop is written here once (a dozen lines).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# objective(x_adv (B, C, H, W)) → (value (B,), ascent direction (B, C, H, W)); higher is better.
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

N_TARGETS = 3  # target classes of the targeted attacks (AutoAttack's standard version uses 9 for APGD-T)
MIN_CLASSES_TARGETED = 4  # APGD-T's targeted DLR loss reads the 3rd and 4th highest scores


def margin(scores: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """CW margin (Carlini & Wagner 2017), positive when fooled: max_{j≠y} s_j − s_y, or s_t − s_y
    towards ``target``. scores (..., B, C), y (B,), target (B,) or None → (..., B)."""
    s_y = scores.gather(-1, y.expand(*scores.shape[:-1])[..., None])[..., 0]
    if target is not None:
        return scores.gather(-1, target.expand(*scores.shape[:-1])[..., None])[..., 0] - s_y
    others = scores.masked_fill(torch.nn.functional.one_hot(y, scores.shape[-1]).bool(), float("-inf"))
    return others.amax(dim=-1) - s_y


def top_targets(scores: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring classes other than y, best first, as APGD-T picks them. (B, C), (B,) → (k, B).

    APGD-T takes the 2nd, 3rd, … highest of the sorted scores; we skip the true class wherever it
    ranks (APGD-T assumes it is first), so a misranked example still gets k wrong classes.
    """
    masked = scores.detach().double().masked_fill(torch.nn.functional.one_hot(y, scores.shape[-1]).bool(), -torch.inf)
    return masked.argsort(dim=-1, descending=True)[:, : max(min(k, scores.shape[-1] - 1), 0)].T


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the ℓ∞ ε-ball around x, then onto [0, 1]."""
    return torch.clamp(x + torch.clamp(x_adv - x, -eps, eps), 0.0, 1.0)


def sign_ascent(
    objective: Objective,
    x: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ℓ∞ PGD maximising ``objective``; the best iterate (start and last included) and its value (B,)."""
    x = x.detach()
    x_adv = x.clone() if start is None else project(start.detach(), x, eps)
    best_x, best = x_adv, None
    for step in range(steps + 1):
        value, direction = objective(x_adv)
        value = value.detach()
        if best is None:
            best_x, best = x_adv, value
        else:
            take = value > best
            best = torch.where(take, value, best)
            best_x = torch.where(take.view(-1, *[1] * (x.dim() - 1)).to(x.device), x_adv, best_x)
        if step < steps:  # the last evaluation only scores the last iterate
            x_adv = project(x_adv + step_size * direction.sign(), x, eps).detach()
    assert best is not None
    return best_x.detach(), best


def unit(g: torch.Tensor) -> torch.Tensor:
    """Each example's gradient at unit ℓ2 norm (in float64, so tiny gradients do not underflow; 0 stays 0)."""
    norm = g.double().flatten(1).norm(dim=1).clamp_min(1e-300)
    return (g.double() / norm.view(-1, *[1] * (g.dim() - 1))).to(g.dtype)
