"""The Lookahead optimiser wrapper (Zhang et al. 2019; Table 16)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from carso_cli.errors import CheckpointError, ConfigError


class Lookahead:
    """Lookahead (Zhang et al. 2019): k fast steps of the inner optimiser, then slow += α(fast − slow).

    Hand-written because torch has none and the registry options (e.g. torch-optimizer) are
    unmaintained; it is a dozen lines. After every k-th step the fast weights are reset to the slow
    ones, so at those points the model holds the slow weights; ``slow_weights()`` swaps them in at any
    other point (what is evaluated and saved). ``state_dict`` holds the inner optimiser's state, the
    slow weights and the step counter.

    Args:
        optimizer: the inner optimiser (RAdam in the paper, Table 16).
        k: fast steps per slow update (Table 16: 6).
        alpha: slow-weights step size (Table 16, "averaging decay": 0.8).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 6, alpha: float = 0.8) -> None:
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ConfigError(f"Lookahead needs k ≥ 1 and 0 < α ≤ 1 (got k={k}, α={alpha})")
        self.optimizer = optimizer
        self.k = k
        self.alpha = alpha
        self.counter = 0
        self.slow = [[p.detach().clone() for p in group["params"]] for group in optimizer.param_groups]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self.counter += 1
        if self.counter % self.k == 0:
            for group, slows in zip(self.optimizer.param_groups, self.slow):
                for p, slow in zip(group["params"], slows):
                    slow.add_(p.detach() - slow, alpha=self.alpha)
                    p.copy_(slow)

    @contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Temporarily put the slow weights into the model (to evaluate or save them)."""
        fast = [[p.detach().clone() for p in g["params"]] for g in self.optimizer.param_groups]
        with torch.no_grad():
            for group, slows in zip(self.optimizer.param_groups, self.slow):
                for p, slow in zip(group["params"], slows):
                    p.copy_(slow)
        try:
            yield
        finally:
            with torch.no_grad():
                for group, saved in zip(self.optimizer.param_groups, fast):
                    for p, f in zip(group["params"], saved):
                        p.copy_(f)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "slow": [[s.clone() for s in slows] for slows in self.slow],
            "counter": self.counter,
            "k": self.k,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        shapes = [[tuple(s.shape) for s in slows] for slows in self.slow]
        if [[tuple(s.shape) for s in slows] for slows in state["slow"]] != shapes:
            raise CheckpointError("the checkpoint's Lookahead slow weights do not match the model")
        with torch.no_grad():
            for mine, theirs in zip(self.slow, state["slow"]):
                for m, t in zip(mine, theirs):
                    m.copy_(t)
        self.counter = int(state["counter"])
