"""carso_cli.training.randomness: seeds keyed by (seed, epoch, batch), RNG capture/restore."""

from __future__ import annotations

import ast
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from carso_cli import training as tr


def test_epoch_batches_are_seeded_per_epoch() -> None:
    a = tr.epoch_batches(100, 32, seed=0, epoch=3)
    assert len(a) == 3 and all(len(b) == 32 for b in a)  # the last partial batch is dropped
    assert all(torch.equal(u, v) for u, v in zip(a, tr.epoch_batches(100, 32, seed=0, epoch=3)))
    assert not torch.equal(a[0], tr.epoch_batches(100, 32, seed=0, epoch=4)[0])
    assert len(set(torch.cat(a).tolist())) == 96  # no example twice


def test_derived_seed_is_distinct_per_key_tuple() -> None:
    """Every (seed, epoch, batch, stream) the loop uses is its own stream — order and length matter too."""
    keys = [(s, e, b, k) for s in (0, 1, 7) for e in range(6) for b in range(-1, 12) for k in (-1, 0, 1, 2)]
    keys += [(0,), (0, 0), (0, 0, 0), (1, 2), (2, 1), (1, 2, 3), (3, 2, 1), (2, 1, 3)]
    seeds = [tr.derived_seed(*k) for k in keys]
    assert len(set(seeds)) == len(keys)
    assert len({s % 2**32 for s in seeds}) == len(keys)  # still distinct where only 32 bits are kept (NumPy)
    large = [tr.derived_seed(k) for k in (2**40, 2**40 + 1, 2**62)]  # keys past 32 bits (64-bit seeds)
    assert len(set(seeds + large)) == len(seeds) + len(large)
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds + large)  # a valid torch.manual_seed


def test_derived_seed_is_stable() -> None:
    """A pure function of its keys: the same in this process and in a fresh interpreter (another hash seed)."""
    keys = [(0, 3, -1), (7, 0, 5, 2), (123456789, 199, 4095)]
    here = [tr.derived_seed(*k) for k in keys]
    assert here == [tr.derived_seed(*k) for k in keys]
    code = f"from carso_cli.training.randomness import derived_seed; print([derived_seed(*k) for k in {keys!r}])"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert ast.literal_eval(fresh.stdout.strip()) == here
    # Same keys → same generator stream; one key changed → another stream.
    a, b = tr.batch_generator(torch.device("cpu"), 0, 3, 1), tr.batch_generator(torch.device("cpu"), 0, 3, 1)
    c = tr.batch_generator(torch.device("cpu"), 0, 3, 2)
    first = torch.rand(8, generator=a)
    assert torch.equal(first, torch.rand(8, generator=b)) and not torch.equal(first, torch.rand(8, generator=c))


def _draws() -> tuple[torch.Tensor, float, float, float, np.ndarray]:
    return torch.rand(5), random.random(), random.gauss(0, 1), np.random.standard_normal(), np.random.rand(3)


def test_capture_restore_rng_round_trip() -> None:
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    # Mid-pair Gaussian caches (Python's gauss, NumPy's legacy normal) are part of the state too.
    random.gauss(0, 1), np.random.standard_normal()
    state = tr.capture_rng()
    first = _draws()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # anything in between
    _draws()
    tr.restore_rng(*state)
    again = _draws()
    assert torch.equal(first[0], again[0])
    assert first[1:4] == again[1:4]
    assert np.array_equal(first[4], again[4])
    assert all(t.dtype == torch.uint8 for t in state[0].values())  # storable in a safetensors file


def test_seed_everything_differs_by_rank() -> None:
    def draws_after(seed: int, rank: int) -> tuple[list[float], float, list[float]]:
        tr.seed_everything(seed, rank)
        return torch.rand(4).tolist(), random.random(), np.random.rand(4).tolist()

    rank0, rank1, other_seed = draws_after(0, 0), draws_after(0, 1), draws_after(1, 0)
    assert draws_after(0, 0) == rank0  # reproducible
    for a, b in zip(rank0, rank1):  # every library, on each rank, draws differently
        assert a != b
    for a, b in zip(rank0, other_seed):
        assert a != b


def test_numpy_seed_depends_on_the_seeds_high_bits() -> None:
    """NumPy is seeded with 32 bits: user seeds differing only in high bits must still differ there."""
    draws = set()
    for seed in (0, 2**36, 2**40, 2**48, 2**62):
        tr.seed_everything(seed)
        draws.add(float(np.random.rand()))
    assert len(draws) == 5
