"""The purifier's VAE loss (section 5.1)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class VAELoss(NamedTuple):
    """Sums over the batch (divide by the number of examples for per-example means)."""

    total: torch.Tensor  # scalar: bce + β·kl
    bce: torch.Tensor  # scalar: Σ_i Σ_pixels BCE(x̂_i, x_i)
    kl: torch.Tensor  # scalar: Σ_i KL(q(z|x_i, c_i) ‖ N(0, I))


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> VAELoss:
    """Summed pixel-wise, channel-wise binary cross-entropy plus β·KL (section 5.1).

    Args:
        x_hat: (B, C, H, W) reconstruction in [0, 1]; x: (B, C, H, W) clean target in [0, 1].
        mu, logvar: (B, fjoint) parameters of the approximate posterior.
        beta: KL weight (``beta_at_epoch``).
    Returns:
        VAELoss of scalars summed over the batch. Computed in float32 (BCE is not autocast-safe).
    """
    x_hat, x, mu, logvar = x_hat.float(), x.float(), mu.float(), logvar.float()
    bce = F.binary_cross_entropy(x_hat, x, reduction="sum")
    kl = -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp())
    return VAELoss(bce + beta * kl, bce, kl)
