"""Per-example seeding: CARSO's z for example *i* depend only on (seed, stream, i), not on the batch.

CARSO is stochastic (the purifier samples z). For clean classification, re-classification and PGD+EoT,
``ExampleSeededSampler`` replaces ``CARSO.latent_sampler`` so that the z of example *i* at its *k*-th
forward comes from a generator seeded by (seed, stream, i, k): results then depend neither on the batch
size nor on the number of processes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from carso_cli.models.carso import CARSO, LatentSampler

STREAM_CLEAN = 0
STREAM_CLEAN_REPEATS = 1
STREAM_ATTACK = 2
STREAM_ADV = 3
STREAM_ADV_REPEATS = 4
STREAM_GRADIENTS = 5
STREAM_EOT_A = 6
STREAM_EOT_B = 7


def example_seed(*parts: int | str, bits: int = 63) -> int:
    """A ``bits``-bit seed hashed from a tuple of ints/strings (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


class ExampleSeededSampler:
    """A ``CARSO.latent_sampler`` whose z for example ``i`` depend only on (seed, stream, i) and the call.

    ``bind(indices)`` names the dataset indices of the rows of the next forwards and gives each example
    its own generator, keyed by (seed, stream, index) with 128 bits (numpy's Philox: torch's CPU
    generator keeps only 32 bits of a seed). Call k then draws the k-th z of every example's stream,
    so an example's z do not depend on which other examples share its batch, or on the process.
    A forward on ``r·B`` rows (an attack stacking ``r`` EoT copies of a batch of ``B``) draws the r
    copies of each example one after the other from its stream.

    z are drawn on the CPU and moved to the device: microseconds per example and call, small beside a
    forward pass through CARSO.
    """

    def __init__(self, seed: int, stream: int) -> None:
        self.seed = seed
        self.stream = stream
        self.indices: list[int] = []
        self.generators: list[np.random.Generator] = []
        self.calls = 0

    def bind(self, indices: Sequence[int]) -> ExampleSeededSampler:
        self.indices = [int(i) for i in indices]
        self.generators = [
            np.random.Generator(np.random.Philox(key=example_seed(self.seed, self.stream, i, bits=128)))
            for i in self.indices
        ]
        self.calls = 0
        return self

    def __call__(self, n: int, b: int, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        k = len(self.indices)
        if k == 0 or b % k:
            raise RuntimeError(f"seeded sampler bound to {k} examples was asked for a batch of {b}")
        z = np.empty((n, b, d), dtype=np.float32)
        for copy in range(b // k):
            for j, g in enumerate(self.generators):
                z[:, copy * k + j] = g.standard_normal((n, d), dtype=np.float32)
        self.calls += 1
        return torch.from_numpy(z).to(device=device, dtype=dtype)


@contextlib.contextmanager
def seeded_latents(model: nn.Module, sampler: LatentSampler | None) -> Iterator[None]:
    """Install ``sampler`` as the latent sampler of ``model`` when it is a CARSO; restore on exit."""
    carso = find_carso(model)
    if carso is None or sampler is None:
        yield
        return
    old = carso.latent_sampler
    carso.latent_sampler = sampler
    try:
        yield
    finally:
        carso.latent_sampler = old


def find_carso(model: nn.Module) -> CARSO | None:
    """The CARSO inside ``model`` (itself, or wrapped by ``CountCalls`` / ``Autocast``), else None."""
    while not isinstance(model, CARSO):
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


@contextlib.contextmanager
def through_wrappers(model: nn.Module) -> Iterator[Callable[[], None]]:
    """For an attack that calls the parts of the CARSO inside ``model`` (its classifier's representation,
    its per-draw logits) rather than ``model`` itself: what the wrappers around it would have done. The
    precision of an ``Autocast`` (entered here) and the progress tick of a ``CountCalls`` (yielded: call
    it once per pass)."""
    ticks: list[Callable[[], None]] = []
    dtype = None
    while not isinstance(model, CARSO):
        on_call = getattr(model, "on_call", None)
        if callable(on_call):
            ticks.append(on_call)
        dtype = getattr(model, "autocast_dtype", None) or dtype
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner

    def tick() -> None:
        for on_call in ticks:
            on_call()

    device_type = next((p.device.type for p in model.parameters()), "cpu")
    with torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
        yield tick


def seed_everything(seed: int) -> None:
    """Seed the global CPU and CUDA generators (what pyautoattack and ``standard_normal_sampler`` use)."""
    torch.manual_seed(seed & 0x7FFF_FFFF)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """argmax of the model's scores. x (B, C, H, W) → labels (B,)."""
    return model(x).argmax(dim=-1)


def classifier_flags(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correctness (B,) bool of a deterministic classifier."""
    return (predict(classifier, x) == y).cpu()


def draw_flags(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    seed: int,
    stream: int,
    repeats: int = 1,
) -> torch.Tensor:
    """Correctness (repeats, B) of ``repeats`` stochastic forwards; row r uses the r-th z of each example's
    own stream (seed, stream, index), whatever the batch. For a deterministic model all rows are equal.
    """
    sampler = ExampleSeededSampler(seed, stream).bind(indices)
    rows = []
    with seeded_latents(model, sampler):
        for _ in range(repeats):
            rows.append((predict(model, x) == y).cpu())
    return torch.stack(rows)
