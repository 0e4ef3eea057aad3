"""Gradient accumulation over micro-batches (``--micro-batch``, issue 9: the paper's batch on one GPU)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from carso_cli.memory import split


def accumulate(
    n: int,
    micro: int | None,
    step: Callable[[slice], torch.Tensor],
    no_sync: Callable[[], AbstractContextManager] | None = None,
    parts: int | None = None,
) -> torch.Tensor:
    """``step(rows)`` (forward + backward of a loss *summed* over ``rows``) over micro-batches; the sum.

    Gradients add up across the calls, so for a summed loss the accumulated gradient is the whole
    batch's — exactly for a model without batch statistics (BatchNorm in eval mode); in train mode
    BatchNorm normalises each micro-batch on its own ("ghost" batch norm). ``no_sync`` (DDP's) wraps all
    but the last micro-batch, so gradients are all-reduced once. ``micro`` None or ≥ n: one call.
    ``parts``: exactly that many micro-batches instead (``training.bounds.pieces``: the same on every rank).
    """
    slices = split(n, micro, parts)
    total: torch.Tensor | None = None
    for i, rows in enumerate(slices):
        context = no_sync() if (no_sync is not None and i < len(slices) - 1) else nullcontext()
        with context:
            sums = step(rows)
        total = sums if total is None else total + sums
    assert total is not None, "an empty batch"
    return total
