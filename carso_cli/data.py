"""Datasets (CIFAR-10/100, TinyImageNet-200, an image folder, a synthetic one) and their loaders.

Every dataset yields ``(x, y)`` with ``x`` a float32 tensor (C, H, W) in [0, 1] at the preset's image
size and ``y`` an int class index; normalisation lives inside the models (RobustBench convention), so
attacks and the purifier see pixels. Training augmentation (torchvision's random crop with padding +
horizontal flip, seeded per example by the training loop) is a preset option; evaluation never augments.

Problems the user can fix (missing files while offline, a class count or channel count that does not
match the preset, an empty folder) raise ``DataError`` with the path and what was expected there.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from carso_cli.classnames import class_names, synthetic_class_names, tinyimagenet_class_names
from carso_cli.config import Config
from carso_cli.errors import DataError

SPLITS = ("train", "test", "val")  # "val" is the test split under its TinyImageNet / ImageFolder name
TINYIMAGENET_DIR = "tiny-imagenet-200"
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta", "cifar-10-python.tar.gz", 10),
    "cifar100": ("cifar-100-python", "train, test, meta", "cifar-100-python.tar.gz", 100),
}

Transform = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------------
# Augmentation and image decoding
# --------------------------------------------------------------------------------------------------


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


def _pil_mode(channels: int) -> str:
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
            img = img.convert(_pil_mode(channels))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    if img.size != (size, size):
        img = TF.center_crop(TF.resize(img, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), size)
    return TF.pil_to_tensor(img).float().div_(255.0)


class FileDataset(Dataset):
    """Images listed as (path, label) pairs, decoded lazily (in the loader's workers)."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        image_size: int,
        channels: int,
        transform: Transform | None = None,
    ) -> None:
        self.samples = samples
        self.classes = classes
        self.image_size = image_size
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        x = load_pil(path, self.image_size, self.channels)
        if self.transform is not None:
            x = self.transform(x)
        return x, label


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W) (CIFAR), converted to float on access."""

    def __init__(self, images: Tensor, labels: list[int], transform: Transform | None = None) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]


# --------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------


def _stable_seed(*parts: Any) -> int:
    """A 63-bit seed from the given values, the same on every machine and Python version."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class SyntheticDataset(Dataset):
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

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]


# --------------------------------------------------------------------------------------------------
# Real datasets
# --------------------------------------------------------------------------------------------------


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown dataset split '{split}' (use train or test)")
    return "train" if split == "train" else "test"


def _check_classes(found: int, cfg: Config, where: str) -> None:
    if found != cfg.data.num_classes:
        raise DataError(f"{where} has {found} classes, but the preset says data.num_classes = {cfg.data.num_classes}")


def _cifar(cfg: Config, split: str, root: Path, download: bool, transform: Transform | None) -> Dataset:
    from torchvision import datasets

    name = cfg.data.dataset
    folder, files, archive, classes = CIFAR_FILES[name]
    _check_classes(classes, cfg, name)
    if cfg.data.channels != 3:
        raise DataError(f"{name} images have 3 channels, but the preset says data.channels = {cfg.data.channels}")
    if cfg.data.image_size != 32:
        raise DataError(f"{name} images are 32×32, but the preset says data.image_size = {cfg.data.image_size}")
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    train = split == "train"
    expected = f"{root / folder}/ ({files}) or the archive {root / archive}"
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(f"{name} not found under {root}: expected {expected} (downloading is off)") from None
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as err:  # noqa: BLE001 - network and archive errors come in many types
            raise DataError(
                f"{name} not found under {root} and could not be downloaded ({type(err).__name__}: {err}); "
                f"expected {expected}"
            ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) uint8 → (N, 3, 32, 32)
    return TensorImageDataset(images, list(ds.targets), transform)


def tinyimagenet_dir(root: Path) -> Path:
    """``root/tiny-imagenet-200`` (or ``root`` itself when it already is that folder)."""
    if (root / "wnids.txt").is_file() and not (root / TINYIMAGENET_DIR).is_dir():
        return root
    return root / TINYIMAGENET_DIR


def _download_tinyimagenet(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(TINYIMAGENET_URL, download_root=str(root), md5=TINYIMAGENET_MD5)
    except Exception as err:  # noqa: BLE001 - network and archive errors come in many types
        raise DataError(
            f"tinyimagenet not found under {root} and could not be downloaded from {TINYIMAGENET_URL} "
            f"({type(err).__name__}: {err}); expected {root / TINYIMAGENET_DIR}/ with wnids.txt, "
            f"train/<wnid>/images/*.JPEG and val/images + val/val_annotations.txt"
        ) from None


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _tinyimagenet(cfg: Config, split: str, root: Path, download: bool, transform: Transform | None) -> Dataset:
    _pil_mode(cfg.data.channels)  # fail now, not inside a loader worker
    base = tinyimagenet_dir(root)
    expected = "wnids.txt, train/<wnid>/images/*.JPEG and val/images + val/val_annotations.txt"
    if not (base / "wnids.txt").is_file():
        if not download:
            raise DataError(f"tinyimagenet not found: expected {base}/ with {expected} (downloading is off)")
        _download_tinyimagenet(root)
        base = root / TINYIMAGENET_DIR
        if not (base / "wnids.txt").is_file():
            raise DataError(f"the downloaded archive did not contain {base / 'wnids.txt'}")
    # Class i is the i-th WordNet id in sorted order, as ImageFolder on train/ assigns (and as
    # classnames.tinyimagenet_class_names names them).
    wnids = sorted({w.strip() for w in (base / "wnids.txt").read_text().splitlines() if w.strip()})
    _check_classes(len(wnids), cfg, f"tinyimagenet ({base / 'wnids.txt'})")
    index = {w: i for i, w in enumerate(wnids)}
    samples: list[tuple[str, int]] = []
    if split == "train":
        for wnid in wnids:
            folder = base / "train" / wnid / "images"
            if not folder.is_dir():
                folder = base / "train" / wnid  # tolerate images directly in the class folder
            if not folder.is_dir():
                raise DataError(f"tinyimagenet: missing {base / 'train' / wnid / 'images'}/ (expected {expected})")
            samples += [(str(p), index[wnid]) for p in _list_images(folder)]
    else:
        val = base / "val"
        annotations = val / "val_annotations.txt"
        if annotations.is_file() and (val / "images").is_dir():
            for line in annotations.read_text().splitlines():
                fields = line.split("\t")
                if len(fields) < 2:
                    continue
                name, wnid = fields[0].strip(), fields[1].strip()
                if wnid not in index:
                    raise DataError(f"{annotations}: class '{wnid}' of {name} is not in wnids.txt")
                path = val / "images" / name
                if not path.is_file():
                    raise DataError(f"{annotations} lists {name}, but {path} does not exist")
                samples.append((str(path), index[wnid]))
        elif val.is_dir() and any((val / w).is_dir() for w in wnids):
            # A common re-organisation: val/<wnid>/(images/)*.JPEG.
            for wnid in wnids:
                folder = val / wnid / "images" if (val / wnid / "images").is_dir() else val / wnid
                if folder.is_dir():
                    samples += [(str(p), index[wnid]) for p in _list_images(folder)]
        else:
            raise DataError(f"tinyimagenet: missing {annotations} or {val / 'images'}/ (expected {expected})")
    if not samples:
        raise DataError(f"tinyimagenet: no images found for the {split} split under {base}")
    return FileDataset(samples, wnids, cfg.data.image_size, cfg.data.channels, transform)


def imagefolder_path(dataset: str) -> Path:
    return Path(dataset.split(":", 1)[1]).expanduser()


def _imagefolder(cfg: Config, split: str, transform: Transform | None) -> Dataset:
    from torchvision.datasets.folder import find_classes, make_dataset

    _pil_mode(cfg.data.channels)  # fail now, not inside a loader worker
    base = imagefolder_path(cfg.data.dataset)
    candidates = ["train"] if split == "train" else ["val", "test"]
    folder = next((base / c for c in candidates if (base / c).is_dir()), None)
    if folder is None:
        raise DataError(
            f"imagefolder: missing {base / candidates[0]}/ (expected {base}/train/<class>/* and {base}/val/<class>/*)"
        )
    try:
        classes, class_to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), class_to_idx, extensions=IMAGE_EXTENSIONS)
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"imagefolder: {folder}: {err}") from None
    _check_classes(len(classes), cfg, f"imagefolder {folder}")
    if split != "train" and (base / "train").is_dir():
        train_classes, _ = find_classes(str(base / "train"))
        if train_classes != classes:
            raise DataError(f"imagefolder: the class folders of {folder} and {base / 'train'} differ")
    return FileDataset(list(samples), classes, cfg.data.image_size, cfg.data.channels, transform)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


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
    split = _check_split(split)
    d = cfg.data
    if augment is None:
        augment = d.augment and split == "train"
    transform = train_augmentation(d.crop_padding, d.image_size) if augment and split == "train" else None
    root = Path(root).expanduser()
    if d.dataset == "synthetic":
        size = d.synthetic_train_size if split == "train" else d.synthetic_test_size
        return SyntheticDataset(size, d.image_size, d.num_classes, d.channels, d.synthetic_seed, split, transform)
    if d.dataset in CIFAR_FILES:
        return _cifar(cfg, split, root, download, transform)
    if d.dataset == "tinyimagenet":
        return _tinyimagenet(cfg, split, root, download, transform)
    if d.dataset.startswith("imagefolder:"):
        return _imagefolder(cfg, split, transform)
    raise DataError(f"unknown dataset '{d.dataset}'")


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
