"""The real datasets: CIFAR-10/100 (torchvision), TinyImageNet-200 (its own layout, downloaded and checked)
and an image folder of the user's (``imagefolder:PATH``), each checked against the preset.

Problems the user can fix (missing files while offline, a class count or channel count that does not
match the preset, an empty folder) raise ``DataError`` with the path and what was expected there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from carso_cli.classnames import TINYIMAGENET_DIR
from carso_cli.config import Config
from carso_cli.data.datasets import FileDataset, TensorImageDataset, Transform, pil_mode
from carso_cli.errors import DataError

SPLITS = ("train", "test", "val")  # "val" is the test split under its TinyImageNet / ImageFolder name
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta", "cifar-10-python.tar.gz", 10),
    "cifar100": ("cifar-100-python", "train, test, meta", "cifar-100-python.tar.gz", 100),
}


def check_split(split: str) -> str:
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
    pil_mode(cfg.data.channels)  # fail now, not inside a loader worker
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

    pil_mode(cfg.data.channels)  # fail now, not inside a loader worker
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


def real_dataset(cfg: Config, split: str, root: Path, download: bool, transform: Transform | None) -> Dataset:
    """The preset's real dataset (``cfg.data.dataset``) for ``split`` ("train" or "test")."""
    d = cfg.data
    if d.dataset in CIFAR_FILES:
        return _cifar(cfg, split, root, download, transform)
    if d.dataset == "tinyimagenet":
        return _tinyimagenet(cfg, split, root, download, transform)
    if d.dataset.startswith("imagefolder:"):
        return _imagefolder(cfg, split, transform)
    raise DataError(f"unknown dataset '{d.dataset}'")
