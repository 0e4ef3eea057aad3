"""The synthetic dataset: class-conditional gratings, generated deterministically (the smoke preset's data,
and every test's)."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

from carso_cli.classnames import synthetic_class_names
from carso_cli.data.datasets import TensorImageDataset, Transform
from carso_cli.errors import DataError


def _stable_seed(*parts: Any) -> int:
    """A 63-bit seed from the given values, the same on every machine and Python version."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SyntheticDataset(TensorImageDataset):
    """A deterministic, class-conditional, learnable image dataset (the smoke preset's data).

    Each class has a prototype: a sum of a few coloured sinusoidal gratings (random wave vector and
    phase). An image of class k is its prototype, circularly shifted by a few pixels, with a random
    contrast, a weaker distractor prototype of another class, a per-channel brightness offset and
    Gaussian pixel noise. A small CNN learns it in a few hundred steps; the noise and distractors keep
    it from being trivial, and the class signal is weak enough per pixel that ℓ∞ perturbations of
    8/255 matter.

    The whole split is generated vectorised at construction (2,000 32×32 images take a few tens of
    milliseconds) and kept as 8-bit pixels, like a real image dataset. It depends only on
    (seed, split, size, image_size, channels, num_classes). Labels are exactly balanced (up to
    ``size % num_classes``) and shuffled by a seeded permutation.
    """

    # Generation constants (pixel scale): tuned so that the task is learnable but not trivial.
    amplitude = 0.22
    noise_std = 0.12
    max_shift_fraction = 0.125  # shifts up to ±4 px at 32×32
    distractor_max = 0.8  # above the minimum contrast (0.7): a few images are ambiguous
    brightness = 0.08
    chunk = 512  # images generated at once (bounds the temporary memory)

    def __init__(
        self,
        size: int,
        image_size: int = 32,
        num_classes: int = 10,
        channels: int = 3,
        seed: int = 0,
        split: str = "train",
        transform: Transform | None = None,
    ) -> None:
        if size < 1 or image_size < 4 or num_classes < 2 or channels < 1:
            raise DataError(
                f"synthetic dataset: need size ≥ 1, image_size ≥ 4, ≥ 2 classes and ≥ 1 channel "
                f"(got {size}, {image_size}, {num_classes}, {channels})"
            )
        self.size, self.image_size, self.num_classes, self.channels = size, image_size, num_classes, channels
        self.seed, self.split, self.transform = seed, split, transform
        self.classes = synthetic_class_names(num_classes)
        # Prototypes depend on the seed only: train and test share classes, not images.
        self.prototypes = self._prototypes(image_size, num_classes, channels, _stable_seed("proto", seed))
        g = torch.Generator().manual_seed(_stable_seed("items", seed, split, size, image_size, channels, num_classes))
        labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=g)]
        self.labels: list[int] = labels.tolist()
        self.images = torch.empty(size, channels, image_size, image_size, dtype=torch.uint8)
        # Small memory-bound operations: one thread is fastest (with several, a busy machine makes
        # them wait on each other), and the result does not depend on the thread count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(0, size, self.chunk):
                self.images[i : i + self.chunk] = self._render(labels[i : i + self.chunk], g)
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def _prototypes(image_size: int, num_classes: int, channels: int, seed: int) -> Tensor:
        """(classes, C, H, W) patterns with values in [-1, 1]."""
        g = torch.Generator().manual_seed(seed)
        gratings = 3
        coords = torch.arange(image_size, dtype=torch.float64) / image_size
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (H, W)
        freq = 1.0 + 3.0 * torch.rand(num_classes, gratings, 1, 1, generator=g, dtype=torch.float64)
        angle = math.pi * torch.rand(num_classes, gratings, 1, 1, generator=g, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(num_classes, gratings, 1, 1, generator=g, dtype=torch.float64)
        # Whole cycles per image along each axis: the pattern is periodic, so circular shifts are seamless.
        kx = torch.round(freq * torch.cos(angle))
        ky = torch.round(freq * torch.sin(angle))
        waves = torch.sin(2 * math.pi * (kx * xx + ky * yy) + phase)  # (classes, gratings, H, W)
        colour = 2 * torch.rand(num_classes, gratings, channels, generator=g, dtype=torch.float64) - 1
        pattern = torch.einsum("kghw,kgc->kchw", waves, colour)
        pattern = pattern / pattern.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
        return pattern.float()

    @staticmethod
    def _roll(images: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
        """Circularly shift each image (N, C, S, S) by its own (dy, dx) (N,) pixels."""
        n, c, s, _ = images.shape
        ar = torch.arange(s)
        rows = (ar - dy[:, None]) % s  # (N, S)
        cols = (ar - dx[:, None]) % s
        index = (rows[:, :, None] * s + cols[:, None, :]).view(n, 1, s * s).expand(n, c, s * s)
        return images.view(n, c, s * s).gather(2, index).view(n, c, s, s)

    def _render(self, labels: Tensor, g: torch.Generator) -> Tensor:
        """Images (N, C, S, S) uint8 of the classes ``labels`` (N,)."""
        n, c, s = labels.shape[0], self.channels, self.image_size
        max_shift = max(1, round(self.max_shift_fraction * s))
        shifts = torch.randint(-max_shift, max_shift + 1, (4, n), generator=g)
        contrast = 0.7 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
        distractor = self.distractor_max * torch.rand(n, 1, 1, 1, generator=g)
        other = (labels + 1 + torch.randint(0, self.num_classes - 1, (n,), generator=g)) % self.num_classes
        offset = self.brightness * (2 * torch.rand(n, c, 1, 1, generator=g) - 1)
        noise = torch.randn(n, c, s, s, generator=g).mul_(255.0 * self.noise_std)
        # Computed on the 0..255 scale directly; the +0.5 makes the uint8 cast (a truncation) round.
        x = noise.add_(offset.add_(0.5).mul_(255.0).add_(0.5))
        x.addcmul_(self._roll(self.prototypes[labels], shifts[0], shifts[1]), (255.0 * self.amplitude) * contrast)
        x.addcmul_(self._roll(self.prototypes[other], shifts[2], shifts[3]), (255.0 * self.amplitude) * distractor)
        return x.clamp_(0.0, 255.0).to(torch.uint8)
