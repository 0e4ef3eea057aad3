"""Learning-rate and β schedules (Table 16; epochs count from 0, a value holds for the whole epoch)."""

from __future__ import annotations

import math

from carso_cli.config import TrainingConfig, resolved_lrs


def lr_at_epoch(t: TrainingConfig, epoch: int) -> float:
    """Learning rate for epoch ``epoch``, in the preset's ``training.schedule`` form."""
    plateau, final = resolved_lrs(t)
    if t.schedule == "code":
        return code_lr_at_epoch(
            t.initial_lr, plateau, final, t.warmup_epochs, t.plateau_epochs, t.annealing_epochs, epoch
        )
    return paper_lr_at_epoch(t.initial_lr, plateau, final, t.warmup_epochs, t.plateau_epochs, t.annealing_epochs, epoch)


def paper_lr_at_epoch(initial: float, plateau: float, final: float, w: int, p: int, a: int, epoch: int) -> float:
    """The paper's schedule (Table 16: linear warm-up, plateau, linear annealing; Smith 2017).

    Warm-up: epochs ``0 … W-1`` go linearly from ``initial`` (epoch 0) towards ``plateau``, which
    epoch ``W`` reaches. Plateau: epochs ``W … W+P-1``. Annealing: linear from the plateau (epoch
    ``W+P-1``) to ``final`` at epoch ``W+P+A-1``, the last epoch (Table 16's "final LR"); later epochs
    (a run extended with ``--epochs``) stay at ``final``.
    """
    if epoch < w:
        return initial + (plateau - initial) * epoch / w
    if epoch < w + p or a == 0:
        return plateau if epoch < w + p else final
    progress = min(1.0, (epoch - (w + p - 1)) / a)
    return plateau + (final - plateau) * progress


def code_lr_at_epoch(initial: float, plateau: float, final: float, w: int, p: int, a: int, epoch: int) -> float:
    """The authors' schedule: ebtorch ``warmed_up_linneal``, closed form (docs/FIDELITY.md, row "LR schedule").

    torch ``SequentialLR`` of ``LinearLR(initial/plateau → 1, over max(3, W) epochs)``, ``ConstantLR``,
    ``LinearLR(1 → final/plateau, over max(3, A) epochs)``, milestones ``max(3, W)`` and
    ``max(3, W) + max(1, P)``, stepped once per epoch. The annealing starts at the second milestone, so
    ``final`` is reached only ``max(3, A)`` epochs later, after the run's last epoch: Table 16's final LR
    is this schedule's LR at the last epoch (4.346e-4 at epoch 199 in (a)/(b), 1.378e-4 at 248 in (c)).
    """
    warm = max(3, w)
    anneal_from = warm + max(1, p)
    if epoch < warm:
        return initial + (plateau - initial) * epoch / warm
    if epoch < anneal_from:
        return plateau
    steps = max(3, a)
    return plateau + (final - plateau) * min(epoch - anneal_from, steps) / steps


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
