"""carso_cli.training.loss: the VAE loss (reconstruction BCE + β·KL)."""

from __future__ import annotations

import torch

from carso_cli import training as tr


def test_vae_loss_components() -> None:
    torch.manual_seed(0)
    x, x_hat = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8).clamp(0.01, 0.99)
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    loss = tr.vae_loss(x_hat, x, mu, logvar, beta=0.25)
    bce = -(x * x_hat.log() + (1 - x) * (1 - x_hat).log()).sum()
    var = logvar.exp()
    kl = 0.5 * (var + mu**2 - 1 - logvar).sum()  # KL(N(μ, σ²) ‖ N(0, I)) in closed form
    assert torch.allclose(loss.bce, bce, rtol=1e-5)
    assert torch.allclose(loss.kl, kl, rtol=1e-5)
    assert torch.allclose(loss.total, bce + 0.25 * kl, rtol=1e-5)
    assert tr.vae_loss(x, x, torch.zeros(4, 5), torch.zeros(4, 5), 1.0).kl.abs() < 1e-6
