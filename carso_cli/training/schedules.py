"""Learning-rate and β schedules (Table 16; epochs count from 0, a value holds for the whole epoch)."""

from __future__ import annotations

import math

from carso_cli.config import TrainingConfig


def lr_at_epoch(t: TrainingConfig, epoch: int) -> float:
    """Learning rate for epoch ``epoch`` (linear warm-up, plateau, linear annealing; Smith 2017).

    Warm-up: epochs ``0 … W-1`` go linearly from ``initial_lr`` (epoch 0) towards ``plateau_lr``, which
    epoch ``W`` reaches. Plateau: epochs ``W … W+P-1``. Annealing: linear from the plateau (epoch
    ``W+P-1``) to ``final_lr`` at epoch ``W+P+A-1``; later epochs (a run extended with ``--epochs``)
    stay at ``final_lr``.
    """
    w, p, a = t.warmup_epochs, t.plateau_epochs, t.annealing_epochs
    if epoch < w:
        return t.initial_lr + (t.plateau_lr - t.initial_lr) * epoch / w
    if epoch < w + p or a == 0:
        return t.plateau_lr if epoch < w + p else t.final_lr
    progress = min(1.0, (epoch - (w + p - 1)) / a)
    return t.plateau_lr + (t.final_lr - t.plateau_lr) * progress




def beta_at_epoch(t: TrainingConfig, epoch: int) -> float:
    """KL weight β for epoch ``epoch``: 0 up to ``beta_start_epoch``, linear to 1 at ``beta_end_epoch``.

    Section 5.1 (β-increase, Higgins et al. 2017): β(start) = 0, β(end) = 1, 1 afterwards.
    """
    s, e = t.beta_start_epoch, t.beta_end_epoch
    if epoch >= e:
        return 1.0
    if epoch <= s:
        return 0.0
    return (epoch - s) / (e - s)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine annealing from ``base_lr`` to 0 over ``total_steps`` (classifier training, per batch)."""
    if total_steps <= 0:
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
