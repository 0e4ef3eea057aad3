"""PGD+EoT on CARSO and the health of input gradients (zero / non-finite entries, EoT agreement)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carso_cli.evaluation.seeding import (
    STREAM_ATTACK,
    STREAM_EOT_A,
    STREAM_EOT_B,
    STREAM_GRADIENTS,
    ExampleSeededSampler,
    example_seed,
    seeded_latents,
)


def pgd_eot_examples(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    *,
    eps: float,
    steps: int,
    step_size: float,
    eot: int,
    seed: int,
    callback: Callable[..., Any] | None = None,
    restarts: int = 1,
    normalise: bool = False,
    keep_best: bool = False,
) -> torch.Tensor:
    """Adversarial examples (B, C, H, W) by the PGD+EoT pipeline of Lee & Kim 2024 (Table 14).

    With the defaults, the paper's attack: one run from x, the last iterate, raw EoT sums. ``restarts``
    > 1 adds runs from uniform random starts (drawn per example from (seed, restart, index)), and the
    point of highest EoT loss over the runs is kept per example; ``keep_best`` keeps the best iterate
    of each run, ``normalise`` scales each draw's gradient to unit norm (see ``attacks.pgd_eot``).
    The attack's z draws are seeded per example (stream ``STREAM_ATTACK``), so the result does not
    depend on the batch.
    """
    from carso_cli.attacks import pgd_eot

    sampler = ExampleSeededSampler(seed, STREAM_ATTACK).bind(indices)
    best_x: torch.Tensor | None = None
    best_loss: torch.Tensor | None = None
    track = keep_best or restarts > 1
    with seeded_latents(model, sampler):
        for r in range(restarts):
            noise = start_noise(x, indices, seed, r) if r > 0 else None
            x_adv, loss = pgd_eot(
                model,
                x,
                y,
                eps,
                steps,
                step_size,
                eot,
                random_start=r > 0,
                callback=callback,
                keep_best=track,
                normalise=normalise,
                start_noise=noise,
                return_loss=True,
            )
            if best_x is None or best_loss is None or loss is None:
                best_x, best_loss = x_adv, loss
                continue
            take = loss > best_loss
            best_x = torch.where(take.view(-1, *[1] * (x.dim() - 1)), x_adv, best_x)
            best_loss = torch.where(take, loss, best_loss)
    assert best_x is not None
    return best_x.detach()


def start_noise(x: torch.Tensor, indices: Sequence[int], seed: int, restart: int) -> torch.Tensor:
    """Uniform [0, 1) draws (B, C, H, W) of a random start, per example from (seed, "start", restart, index)."""
    rows = [
        np.random.Generator(np.random.Philox(key=example_seed(seed, "start", restart, int(i), bits=128))).random(
            tuple(x.shape[1:]), dtype=np.float32
        )
        for i in indices
    ]
    return torch.from_numpy(np.stack(rows)).to(x.device, x.dtype)


@dataclass
class GradientStats:
    """Health of input gradients of an attack loss on the model's scores, over examples × draws."""

    entries: int = 0
    zero_entries: int = 0
    nonfinite_entries: int = 0
    gradients: int = 0  # examples × draws
    bad_gradients: int = 0  # entirely zero, or with a non-finite entry (useless for a sign step)
    excluded: int = 0  # gradients left out because the loss is flat by construction (DLR, label 3rd)

    def __add__(self, other: GradientStats) -> GradientStats:
        return GradientStats(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "bad_entry_fraction": self.bad_entry_fraction,
            "bad_gradient_fraction": self.bad_gradient_fraction,
        }

    @property
    def bad_entry_fraction(self) -> float:
        return (self.zero_entries + self.nonfinite_entries) / max(self.entries, 1)

    @property
    def bad_gradient_fraction(self) -> float:
        return self.bad_gradients / max(self.gradients, 1)


def dlr_loss(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AutoAttack's difference-of-logits-ratio loss (Croce & Hein 2020), per example. (B, C), (B,) → (B,)."""
    s_sorted, order = scores.sort(dim=1)
    top_is_y = (order[:, -1] == y).to(scores.dtype)
    s_y = scores.gather(1, y[:, None])[:, 0]
    best_other = s_sorted[:, -2] * top_is_y + s_sorted[:, -1] * (1.0 - top_is_y)
    return -(s_y - best_other) / (s_sorted[:, -1] - s_sorted[:, -3] + 1e-12)


LOSSES = {
    "ce": lambda scores, y: F.cross_entropy(scores, y, reduction="none"),
    "dlr": dlr_loss,
}


def input_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "ce",
    return_scores: bool = False,
) -> Any:
    """∇ₓ Σ loss(model(x), y): (B, C, H, W) — "ce" or "dlr", the losses of randAA's two APGD runs.

    With ``return_scores`` also the model's scores (B, classes) of that same forward.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores = model(x)
        scores = scores if scores.dtype == torch.float64 else scores.float()
        value = LOSSES[loss](scores, y).sum()
        (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    grad = torch.zeros_like(x) if grad is None else grad.detach()
    return (grad, scores.detach()) if return_scores else grad


def label_rank(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0-based rank of the label among the scores (0 = predicted). (B, C), (B,) → (B,)."""
    return (scores > scores.gather(1, y[:, None])).sum(dim=1)


def gradient_health(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    *,
    draws: int,
    seed: int,
    loss: str = "ce",
) -> GradientStats:
    """Count zero / non-finite gradient entries and useless gradients over ``draws`` stochastic draws.

    For DLR, examples whose label is ranked third are left out (and counted in ``excluded``): there the
    loss is −(z_y − z_π1)/(z_π1 − z_π3) ≡ 1, flat by construction of the loss, not by the model.
    """
    sampler = ExampleSeededSampler(seed, STREAM_GRADIENTS).bind(indices)
    stats = GradientStats()
    with seeded_latents(model, sampler):
        for _ in range(draws):
            g, scores = input_gradient(model, x, y, loss, return_scores=True)
            g = g.flatten(1)
            if loss == "dlr":
                keep = label_rank(scores, y) != 2
                stats.excluded += int((~keep).sum())
                g = g[keep]
            finite = torch.isfinite(g)
            zero = g == 0
            stats.entries += g.numel()
            stats.zero_entries += int(zero.sum())
            stats.nonfinite_entries += int((~finite).sum())
            stats.gradients += g.shape[0]
            stats.bad_gradients += int((zero.all(dim=1) | ~finite.all(dim=1)).sum())
    return stats


def eot_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sampler: ExampleSeededSampler, eot: int, loss: str = "ce"
) -> torch.Tensor:
    """Mean input gradient over ``eot`` draws (the EoT estimate). (B, C, H, W)."""
    total = torch.zeros_like(x)
    with seeded_latents(model, sampler):
        for _ in range(eot):
            total += input_gradient(model, x, y, loss)
    return total / eot


def eot_agreement(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    *,
    eot: int,
    seed: int,
    loss: str = "ce",
) -> torch.Tensor:
    """Cosine (B,) between two independent EoT gradient estimates of each example (0 if one is zero)."""
    a = eot_gradient(model, x, y, ExampleSeededSampler(seed, STREAM_EOT_A).bind(indices), eot, loss).flatten(1)
    b = eot_gradient(model, x, y, ExampleSeededSampler(seed, STREAM_EOT_B).bind(indices), eot, loss).flatten(1)
    cos = F.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-300)
    return torch.nan_to_num(cos, nan=0.0).float().cpu()
