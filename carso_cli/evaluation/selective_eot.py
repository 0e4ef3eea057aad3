"""Selective EoT (DiffHammer, Wang et al., NeurIPS 2024): attack the draws that share a vulnerability.

EoT averages the gradient over all draws of the purifier. When only some draws are vulnerable (they
share a direction along which the input fools them) and the others are not (their gradients point
elsewhere, or are noise), the average dilutes the useful direction, and EoT with a practical number of
draws does not follow it: DiffHammer's "gradient dilemma". DiffHammer's selective attack weights each
draw by whether the current point already fools it (an EM step over which draws belong to the
vulnerable cluster) and ascends only on those. Here a draw is one reconstruction (one z) of one
forward, and per example and step the selected draws are those already fooled (CW margin > 0 on
their own logits) together with the top ``select`` fraction by that margin (the draws closest to
fooled: before any draw is fooled, the cluster's best guess). The step ascends the mean margin of the
selected draws. Each draw is scored once without gradient and the forwards holding a selected draw are
recomputed with gradient for the same z, so memory stays that of one forward.

An example is broken when any draw of the judge's decision is fooled (the paper's rule plus
re-classification), so concentrating on the draws that can be fooled is the right objective for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from carso_cli.evaluation.ascent import margin, sign_ascent
from carso_cli.evaluation.seeding import ExampleSeededSampler, find_carso, seeded_latents, through_wrappers
from carso_cli.evaluation.settings import EvalSettings

SELECT = 1 / 8  # the fraction of draws (the closest to fooled) ascended on, besides those already fooled
STREAM_SELECTIVE = 20  # the attack's own z stream (seeding's streams are 0–7)


def selection(m: torch.Tensor, select: float = SELECT) -> torch.Tensor:
    """The draws ascended on: fooled (m > 0) or among the top ⌈select·D⌉ margins. (D, B) → (D, B) bool."""
    k = max(1, math.ceil(select * m.shape[0]))
    kth = m.topk(k, dim=0).values[-1]  # (B,)
    return (m > 0) | (m >= kth[None])


def selective_objective(
    model: nn.Module, y: torch.Tensor, eot: int, select: float = SELECT, tick: Callable[[], None] = lambda: None
):
    """Per example the mean CW margin of the selected draws (B,) and its input gradient."""
    carso = find_carso(model)
    if carso is None:
        raise ValueError("selective EoT needs a CARSO model (its per-reconstruction logits)")

    def objective(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_adv = x_adv.detach()
        zs, margins = [], []
        with torch.no_grad():
            for _ in range(eot):
                z = carso.sample_latent(x_adv.shape[0], x_adv.device, x_adv.dtype)
                zs.append(z)
                margins.append(margin(carso.reconstruction_logits(x_adv, z).double(), y))  # (N, B)
                tick()
        m = torch.cat(margins)  # (eot·N, B)
        chosen = selection(m, select)
        count = chosen.sum(dim=0).clamp_min(1)
        value = (m * chosen).sum(dim=0) / count
        grad = torch.zeros_like(x_adv)
        n = margins[0].shape[0]
        for e, z in enumerate(zs):
            w = chosen[e * n : (e + 1) * n].double() / count  # (N, B)
            if not w.any():
                continue
            xr = x_adv.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = (w * margin(carso.reconstruction_logits(xr, z).double(), y)).sum()
                (g,) = torch.autograd.grad(loss, xr)
            tick()
            grad += g
        return value, grad

    return objective


def selective_eot_points(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: Sequence[int], s: EvalSettings, select: float = SELECT
) -> tuple[torch.Tensor, list[str]]:
    """Candidates (1, B, C, H, W), source "selective-eot": PGD from x on the selective objective, the best
    iterate; the draws seeded per example (stream ``STREAM_SELECTIVE``), so batches do not matter."""
    sampler = ExampleSeededSampler(s.seed, STREAM_SELECTIVE).bind(idx)
    with seeded_latents(model, sampler), through_wrappers(model) as tick:  # it bypasses the wrappers' forward
        objective = selective_objective(model, y, s.pgd_eot, select, tick)
        point, _ = sign_ascent(objective, x, eps=s.eps, steps=s.pgd_steps, step_size=s.pgd_step_size)
    return point[None], ["selective-eot"]
