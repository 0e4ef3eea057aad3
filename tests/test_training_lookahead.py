"""carso_cli.training.lookahead: the Lookahead optimiser wrapper."""

from __future__ import annotations

import torch

from carso_cli import training as tr


def test_lookahead_matches_the_definition() -> None:
    """k fast SGD steps, then slow ← slow + α(fast − slow) and fast ← slow."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = tr.Lookahead(torch.optim.SGD([w], lr=0.1), k=3, alpha=0.5)
    slow, fast = w.detach().clone(), w.detach().clone()
    for step in range(1, 8):
        opt.zero_grad()
        (w**2).sum().backward()  # gradient 2w
        opt.step()
        fast = fast - 0.1 * 2 * fast
        if step % 3 == 0:
            slow = slow + 0.5 * (fast - slow)
            fast = slow.clone()
        assert torch.allclose(w.detach(), fast)
    assert torch.allclose(opt.slow[0][0], slow)
    with opt.slow_weights():
        assert torch.allclose(w.detach(), slow)
    assert torch.allclose(w.detach(), fast)  # the fast weights come back
