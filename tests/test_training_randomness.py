"""carso_cli.training.randomness: seeds keyed by (seed, epoch, batch), RNG capture/restore."""

from __future__ import annotations

import torch

from carso_cli import training as tr


def test_epoch_batches_are_seeded_per_epoch() -> None:
    a = tr.epoch_batches(100, 32, seed=0, epoch=3)
    assert len(a) == 3 and all(len(b) == 32 for b in a)  # the last partial batch is dropped
    assert all(torch.equal(u, v) for u, v in zip(a, tr.epoch_batches(100, 32, seed=0, epoch=3)))
    assert not torch.equal(a[0], tr.epoch_batches(100, 32, seed=0, epoch=4)[0])
    assert len(set(torch.cat(a).tolist())) == 96  # no example twice
