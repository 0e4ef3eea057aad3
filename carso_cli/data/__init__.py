"""Datasets (CIFAR-10/100, TinyImageNet-200, an image folder, a synthetic one) and their loaders.

``build_dataset`` gives the preset's dataset for a split; ``make_loader`` its reproducible loader. Every
dataset yields ``(x, y)`` with ``x`` a float32 tensor (C, H, W) in [0, 1] at the preset's image size and
``y`` an int class index. Training augmentation (torchvision's random crop with padding + horizontal flip,
seeded per example by the training loop) is a preset option; evaluation never augments. The modules:
``datasets`` (decoding, the dataset classes, augmentation), ``synthetic`` (the generated dataset),
``sources`` (the real datasets, checked against the preset).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from carso_cli.classnames import class_names, synthetic_class_names, tinyimagenet_class_names
from carso_cli.config import Config
from carso_cli.data.datasets import (
    FileDataset,
    SeededExamples,
    TensorImageDataset,
    Transform,
    load_pil,
    train_augmentation,
)
from carso_cli.data.sources import check_split, imagefolder_path, real_dataset, tinyimagenet_dir
from carso_cli.data.synthetic import SyntheticDataset

__all__ = [
    "FileDataset",
    "SeededExamples",
    "SyntheticDataset",
    "TensorImageDataset",
    "Transform",
    "build_dataset",
    "dataset_class_names",
    "load_pil",
    "make_loader",
    "to_device",
    "train_augmentation",
]


def build_dataset(
    cfg: Config,
    split: str,
    root: Path | str = "data",
    download: bool = True,
    augment: bool | None = None,
) -> Dataset:
    """The preset's dataset for one split.

    Args:
        cfg: the preset (``cfg.data`` picks the dataset, sizes and augmentation).
        split: "train" or "test" ("val" is an alias of "test").
        root: where datasets live and are downloaded (``--data-root``).
        download: fetch CIFAR / TinyImageNet when absent (offline → DataError).
        augment: None → ``cfg.data.augment`` for the train split; the test split never augments.

    Returns:
        A dataset of (x float32 (C, H, W) in [0, 1], y int).
    """
    split = check_split(split)
    d = cfg.data
    if augment is None:
        augment = d.augment and split == "train"
    transform = train_augmentation(d.crop_padding, d.image_size) if augment and split == "train" else None
    root = Path(root).expanduser()
    if d.dataset == "synthetic":
        size = d.synthetic_train_size if split == "train" else d.synthetic_test_size
        return SyntheticDataset(size, d.image_size, d.num_classes, d.channels, d.synthetic_seed, split, transform)
    return real_dataset(cfg, split, root, download, transform)


def dataset_class_names(cfg: Config, root: Path | str = "data") -> list[str] | None:
    """Human-readable class names, index-aligned with the labels; None when unknown.

    An imagefolder's class folders (sorted, as the labels), CIFAR's and TinyImageNet's names, the
    synthetic set's numbers. What a run stores (``classnames.write_run_class_names``).
    """
    dataset = cfg.data.dataset
    if dataset.startswith("imagefolder:"):
        from torchvision.datasets.folder import find_classes

        train = imagefolder_path(dataset) / "train"
        try:
            return find_classes(str(train))[0]
        except (FileNotFoundError, OSError):
            return None
    if dataset == "synthetic":
        return synthetic_class_names(cfg.data.num_classes)
    if dataset == "tinyimagenet":
        return tinyimagenet_class_names(tinyimagenet_dir(Path(root).expanduser()))
    return class_names(dataset, Path(root))


def _seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs from the worker's torch seed (itself from the loader generator)."""
    import random

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency, but stay usable without it
        pass


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    device: torch.device,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Any = None,
) -> DataLoader:
    """A DataLoader with reproducible shuffling and, on CUDA, pinned memory and persistent workers.

    Copy batches with ``x.to(device, non_blocking=True)`` (see ``to_device``) to overlap the copy
    with compute. A ``sampler`` (e.g. a DistributedSampler) replaces ``shuffle``.
    """
    cuda = torch.device(device).type == "cuda"
    generator = torch.Generator().manual_seed(seed)
    num_workers = max(0, min(num_workers, os.cpu_count() or 1))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=cuda,
        persistent_workers=cuda and num_workers > 0,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )


def to_device(x: Tensor, y: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Move a batch to ``device`` without blocking (the loader pins memory on CUDA)."""
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
