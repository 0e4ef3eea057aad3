"""Gradient accumulation over micro-batches (``--micro-batch``, issue 9: the paper's batch on one GPU)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch


def accumulate(n: int, micro: int | None, step: Callable[[slice], torch.Tensor],
               no_sync: Callable[[], AbstractContextManager] | None = None) -> torch.Tensor:
    """``step(rows)`` (forward + backward of a loss *summed* over ``rows``) over micro-batches; the sum.

    Gradients add up across the calls, so for a summed loss the accumulated gradient is the whole
    batch's — exactly for a model without batch statistics (BatchNorm in eval mode); in train mode
    BatchNorm normalises each micro-batch on its own ("ghost" batch norm). ``no_sync`` (DDP's) wraps all
    but the last micro-batch, so gradients are all-reduced once. ``micro`` None or ≥ n: one call.
    """
    size = micro if micro else n
    starts = list(range(0, n, size))
    total: torch.Tensor | None = None
    for lo in starts:
        context = no_sync() if (no_sync is not None and lo != starts[-1]) else nullcontext()
        with context:
            sums = step(slice(lo, min(lo + size, n)))
        total = sums if total is None else total + sums
    assert total is not None, "an empty batch"
    return total
