"""Image examples: decoding an image file, the datasets of (image, label) pairs held as files or in memory,
training augmentation and its per-example seeding.

Every dataset yields ``(x, y)`` with ``x`` a float32 tensor (C, H, W) in [0, 1] and ``y`` an int class
index; normalisation lives inside the models (RobustBench convention), so attacks and the purifier see pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from carso_cli.errors import DataError

Transform = Callable[[Tensor], Tensor]


def train_augmentation(padding: int, size: int) -> Transform:
    """Random crop of ``size`` from the image zero-padded by ``padding`` + random horizontal flip.

    torchvision's own ``transforms.v2`` (the field's standard CIFAR augmentation), on (C, H, W) tensors.
    They draw from torch's global RNG; ``SeededExamples`` seeds that RNG per example, so the augmentation
    of an example depends only on (seed, epoch, index), not on workers, processes or a resume.
    """
    from torchvision.transforms import v2

    steps: list[Transform] = []
    if padding > 0:
        steps.append(v2.RandomCrop(size, padding=padding, fill=0, padding_mode="constant"))
    steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps)


class SeededExamples(Dataset):
    """``dataset`` with each example's random transform seeded by ``seed_of(index)``.

    The draw happens inside ``torch.random.fork_rng`` (CPU only), so reading an example neither depends
    on nor changes the process's global RNG: example *i* of an epoch is augmented the same in one process
    or N, with or without loader workers, and after a mid-epoch resume. ``seed_of`` must pickle (a
    module-level function or a ``functools.partial`` of one) for loader workers.
    """

    def __init__(self, dataset: Dataset, seed_of: Callable[[int], int]) -> None:
        self.dataset, self.seed_of = dataset, seed_of

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed_of(int(index)))
            return self.dataset[index]


def pil_mode(channels: int) -> str:
    if channels == 3:
        return "RGB"
    if channels == 1:
        return "L"
    raise DataError(f"data.channels = {channels}: image files can only be read as 1 (grey) or 3 (RGB) channels")


def load_pil(path: str | Path, size: int, channels: int) -> Tensor:
    """An image file → float32 (channels, size, size) in [0, 1].

    Grey images are converted to RGB (TinyImageNet has a few) and vice versa; an image of another
    size is resized (shorter side to ``size``, antialiased) and centre-cropped to a square.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as img:
            img = img.convert(pil_mode(channels))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    if img.size != (size, size):
        img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), size)
    return TF.pil_to_tensor(img).float().div_(255.0)


class _LabelledImages(Dataset):
    """An image dataset of (image in [0, 1], label) pairs; ``transform`` (augmentation) applies on access.

    A subclass says how to read its ``index``-th example (``_example``) and how many there are."""

    transform: Transform | None = None

    def _example(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x, label = self._example(index)
        return (x if self.transform is None else self.transform(x)), label


@dataclass(eq=False, repr=False)
class FileDataset(_LabelledImages):
    """Images listed as (path, label) pairs, decoded lazily (in the loader's workers)."""

    samples: list[tuple[str, int]]
    classes: list[str]
    image_size: int
    channels: int
    transform: Transform | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _example(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return load_pil(path, self.image_size, self.channels), label


@dataclass(eq=False, repr=False)
class TensorImageDataset(_LabelledImages):
    """Images held in memory as uint8 (N, C, H, W) (CIFAR, the synthetic data), converted to float on access."""

    images: Tensor
    labels: list[int]
    transform: Transform | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def _example(self, index: int) -> tuple[Tensor, int]:
        return self.images[index].float().div_(255.0), self.labels[index]
