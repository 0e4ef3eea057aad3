"""Adversarially-balanced batches (section 4.4): which examples are attacked, and the attacked batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from carso_cli.config import AttackConfig
from carso_cli.errors import ConfigError

# The four attack groups, in the order the even split fills them (section 4.4).
ATTACK_GROUPS = ("FGSM ε/2", "PGD ε/2", "FGSM ε", "PGD ε")
CLEAN = -1


@dataclass(frozen=True)
class BalancedPlan:
    """Which examples of a batch are perturbed, and how.

    ``groups[i]`` is ``CLEAN`` (-1) or the index of example ``i``'s attack group in ``ATTACK_GROUPS``.
    """

    groups: torch.Tensor  # (B,) int64

    @property
    def counts(self) -> tuple[int, ...]:
        """Examples per attack group (in ``ATTACK_GROUPS`` order)."""
        return tuple(int((self.groups == g).sum()) for g in range(len(ATTACK_GROUPS)))

    @property
    def perturbed(self) -> int:
        return int((self.groups != CLEAN).sum())

    def slice(self, lo: int, hi: int) -> BalancedPlan:
        """The plan of examples ``lo … hi-1`` (a rank's shard of the global batch)."""
        return BalancedPlan(self.groups[lo:hi])


def adversarial_count(batch_size: int, fraction: float, counting: str = "global", world_size: int = 1) -> int:
    """How many examples of a global batch of ``batch_size`` are perturbed (``training.adversarial_count``).

    - ``"global"`` (the paper, Table 16): ``round(fraction · B)``, half-way rounding up.
    - ``"per-process"`` (the authors' code, ebtorch ``AdverApply``): each of ``world_size`` processes
      perturbs ``int(b · fraction // 4)`` examples per attack, ``b = max(B // world_size, 2)`` its batch;
      e.g. scenario (c), 1024 over 8 processes: 1.28 // 4 = 0, no adversarial example at all.
    """
    if counting == "global":
        return math.floor(fraction * batch_size + 0.5)
    if counting != "per-process":
        raise ConfigError(f"training.adversarial_count must be 'global' or 'per-process', got {counting!r}")
    per_process = max(batch_size // world_size, 2)
    per_attack = int((per_process * fraction) // len(ATTACK_GROUPS))
    return min(batch_size, per_attack * len(ATTACK_GROUPS) * world_size)


def balanced_batch_plan(batch_size: int, fraction: float, count: int | None = None) -> BalancedPlan:
    """The composition of an adversarially-balanced batch of ``batch_size`` examples.

    ``count`` examples (default ``round(fraction · B)``, half-way rounding up; see ``adversarial_count``)
    are perturbed, split as evenly as possible
    among FGSM ε/2, PGD ε/2, FGSM ε, PGD ε, earlier groups taking the remainder. The batch is
    shuffled, so which positions are perturbed does not matter for the data; they are spread evenly
    over the batch (Bresenham) and cycle through the groups, so that every rank's contiguous shard of a
    global batch gets the same mix (equal attack work per GPU).
    """
    if batch_size < 0 or not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"bad balanced batch: batch_size {batch_size}, fraction {fraction}")
    n = adversarial_count(batch_size, fraction) if count is None else count
    if not 0 <= n <= batch_size:
        raise ConfigError(f"bad balanced batch: {n} perturbed examples in a batch of {batch_size}")
    groups = torch.full((batch_size,), CLEAN, dtype=torch.long)
    k = 0
    for i in range(batch_size):
        # Example i is perturbed when the running quota floor((i+1)·n/B) goes up at i.
        if (i + 1) * n // batch_size > i * n // batch_size:
            groups[i] = k % len(ATTACK_GROUPS)
            k += 1
    return BalancedPlan(groups)


def attack_strengths(attacks: AttackConfig, scale: float = 1.0) -> tuple[float, float, float, float]:
    """Pixel ε of the four groups (ATTACK_GROUPS order) from the preset's ``fgsm_eps`` and ``pgd_eps``.

    ``scale``: pixel ε per unit of those values (``config.eps_scale``: 1, or C / Σ std when they are given
    in the classifier's normalised space, ``attacks.train_eps_space = "normalised"``).
    """
    for key in ("fgsm_eps", "pgd_eps"):
        if len(getattr(attacks, key)) != 2:
            raise ConfigError(f"attacks.{key} needs 2 values (ε/2 and ε, section 4.4)")
    return tuple(e * scale for e in (attacks.fgsm_eps[0], attacks.pgd_eps[0], attacks.fgsm_eps[1], attacks.pgd_eps[1]))


def make_balanced_batch(
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: BalancedPlan,
    attacks: AttackConfig,
    generator: torch.Generator | None = None,
    global_plan: BalancedPlan | None = None,
    offset: int = 0,
    eps_scale: float = 1.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """The purifier's input for a batch: clean examples as they are, the others attacked.

    One FGSM call (FGSM ε/2 and ε, per-example ε) and one PGD call (PGD ε/2 and ε) against the classifier.

    Args:
        classifier: the frozen classifier (eval mode).
        x: (B, C, H, W) clean images in [0, 1]; y: (B,) labels.
        plan: this batch's composition (``balanced_batch_plan(...)``, sliced to this rank).
        generator: source of the PGD random starts.
        global_plan, offset: when ``x`` is rows ``offset : offset+B`` of a global batch with plan
            ``global_plan``, the random starts are drawn for all PGD examples of the global batch (in
            batch order) and this rank takes its own: the result does not depend on the rank split.
            Without them, the draws are exactly those of ``attacks.pgd(..., generator=generator)``.
        eps_scale: pixel ε per unit of ``attacks.fgsm_eps``/``pgd_eps`` (``attack_strengths``).
        chunk: attack at most this many examples at once (``--attack-chunk``; None: all). The attacks
            are per-example, so this bounds memory without changing the result.
    Returns:
        (B, C, H, W) purifier input in [0, 1].
    """
    from carso_cli import attacks as atk

    if plan.groups.shape[0] != x.shape[0]:
        raise ValueError(f"plan for {plan.groups.shape[0]} examples, batch of {x.shape[0]}")
    strengths = torch.tensor(attack_strengths(attacks, eps_scale), dtype=x.dtype, device=x.device)
    groups = plan.groups.to(x.device)
    x_in = x.clone()
    fgsm_idx = torch.nonzero((groups == 0) | (groups == 2)).flatten()
    pgd_idx = torch.nonzero((groups == 1) | (groups == 3)).flatten()
    if fgsm_idx.numel():
        x_in[fgsm_idx] = atk.in_chunks(
            atk.fgsm, chunk, classifier, x[fgsm_idx], y[fgsm_idx], strengths[groups[fgsm_idx]]
        )
    whole, offset = (plan, 0) if global_plan is None else (global_plan, offset)
    noise = _pgd_start_noise(x, whole, offset, pgd_idx.numel(), generator) if attacks.pgd_random_start else None
    if pgd_idx.numel():
        x_in[pgd_idx] = atk.in_chunks(
            atk.pgd,
            chunk,
            classifier,
            x[pgd_idx],
            y[pgd_idx],
            strengths[groups[pgd_idx]],
            attacks.pgd_steps,
            attacks.pgd_step_size,
            random_start=noise is not None,
            start_noise=noise,
        )
    return x_in


def _pgd_start_noise(
    x: torch.Tensor, global_plan: BalancedPlan, offset: int, n: int, generator: torch.Generator | None
) -> torch.Tensor | None:
    """The uniform random starts of this rank's ``n`` PGD examples, (n, C, H, W); None when the global
    batch has no PGD example.

    One draw for the PGD examples of the global batch, as ``attacks.pgd`` draws it; ours are rows
    before … before+n of it (the PGD examples of earlier ranks come first). A rank with none draws too,
    to keep its generator in step with the other ranks.
    """
    global_pgd = (global_plan.groups == 1) | (global_plan.groups == 3)
    total = int(global_pgd.sum())
    if total == 0:
        return None
    device = generator.device if generator is not None else x.device
    before = int(global_pgd[:offset].sum())
    noise = torch.rand((total, *x.shape[1:]), generator=generator, device=device, dtype=x.dtype)
    return noise[before : before + n]
