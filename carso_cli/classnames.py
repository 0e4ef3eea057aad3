"""Human-readable class names: the paper's datasets', and the ones a run directory stores.

A run keeps the names of the dataset it was trained on in ``classes.json`` (written with the run by
``train-purifier``, ``convert`` and ``pull``), so an imagefolder's folder names survive the dataset;
``run_class_names`` reads them, and falls back to the dataset's names for runs made before.

CIFAR-10 and CIFAR-100 names are listed in torchvision's order (the order of the datasets' own
``batches.meta`` / ``meta`` files, i.e. the class indices every published checkpoint uses).
TinyImageNet-200 names come from the dataset's ``wnids.txt`` and ``words.txt`` when they are on disk;
their index order is the sorted WordNet ids, which is what ``torchvision.datasets.ImageFolder`` on the
``train/`` folder (and so every TinyImageNet checkpoint trained that way) assigns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from carso_cli.errors import CarsoError

CLASSES_FILE = "classes.json"  # in a run directory
CLASSES_FORMAT = "carso-classes/1"

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

CIFAR100_CLASSES: tuple[str, ...] = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)

TINYIMAGENET_DIR = "tiny-imagenet-200"


def tinyimagenet_class_names(root: Path) -> list[str] | None:
    """Names of the 200 TinyImageNet classes from ``root/{wnids.txt,words.txt}``; None if absent.

    Index i is the i-th WordNet id in sorted order (ImageFolder's order). A name is the first synonym
    of the id's entry in ``words.txt`` ("goldfish, Carassius auratus" → "goldfish"); an id without an
    entry keeps the id itself.
    """
    wnids_file, words_file = root / "wnids.txt", root / "words.txt"
    if not wnids_file.is_file():
        return None
    try:
        wnids = sorted({line.strip() for line in wnids_file.read_text().splitlines() if line.strip()})
        words: dict[str, str] = {}
        if words_file.is_file():
            for line in words_file.read_text().splitlines():
                wnid, _, text = line.partition("\t")
                if text:
                    words[wnid.strip()] = text.split(",")[0].strip()
    except (OSError, UnicodeDecodeError):
        return None  # names are a convenience: an unreadable file falls back to "class N"
    return [words.get(wnid, wnid) for wnid in wnids]


def class_names(dataset: str, data_root: Path | None = None) -> list[str] | None:
    """The class names of ``dataset`` (a preset's ``data.dataset``), or None when unknown.

    Args:
        dataset: "cifar10", "cifar100", "tinyimagenet", … (other datasets have no known names).
        data_root: where datasets live; TinyImageNet names are read from
            ``data_root/tiny-imagenet-200/`` when present (default root: ``./data``).
    """
    if dataset == "cifar10":
        return list(CIFAR10_CLASSES)
    if dataset == "cifar100":
        return list(CIFAR100_CLASSES)
    if dataset == "tinyimagenet":
        return tinyimagenet_class_names(Path(data_root if data_root is not None else "data") / TINYIMAGENET_DIR)
    return None


def label(names: list[str] | None, index: int) -> str:
    """The name of class ``index``, or "class N" when names are unknown (or do not cover it)."""
    if names is not None and 0 <= index < len(names):
        return names[index]
    return f"class {index}"


def synthetic_class_names(num_classes: int) -> list[str]:
    """The synthetic dataset's classes have no names: their numbers, "0" … "C-1"."""
    return [str(k) for k in range(num_classes)]


def write_run_class_names(run: Path, names: Sequence[str]) -> None:
    """Store ``names`` (index-aligned with the labels) in ``run/classes.json``, atomically."""
    from carso_cli.checkpoint import atomic_write_json  # lazy: this module stays free of torch

    atomic_write_json(Path(run) / CLASSES_FILE, {"format": CLASSES_FORMAT, "classes": [str(n) for n in names]})


def stored_class_names(run: Path) -> list[str] | None:
    """The names a run stored, or None: a run made before names were stored, or an unreadable file."""
    try:
        data: Any = json.loads((Path(run) / CLASSES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    names = data.get("classes") if isinstance(data, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return names


def run_class_names(
    run: Path | None, cfg: Any, data_root: Path | str | None = None, notify: Callable[[str], None] = lambda _msg: None
) -> list[str] | None:
    """A run's class names: the stored ones, else the dataset's (as before names were stored), else None.

    Args:
        run: the run directory (None: a classifier without a run, only the dataset's names).
        cfg: the run's config (``cfg.data.dataset``, ``cfg.data.num_classes``).
        notify: told why names that do not fit the model are not used.
    Returns:
        ``cfg.data.num_classes`` names, or None ("class N" then, see ``label``).
    """
    from carso_cli.data import dataset_class_names  # lazy: data imports torch and torchvision

    names = stored_class_names(run) if run is not None else None
    source = f"{run}/{CLASSES_FILE}"
    if names is None:
        names = dataset_class_names(cfg, data_root if data_root is not None else "data")
        source = cfg.data.dataset
    if names is not None and len(names) != cfg.data.num_classes:
        notify(
            f"{len(names)} class names found for {source}, but the model has {cfg.data.num_classes} classes: "
            "using numbers"
        )
        return None
    if names is None and cfg.data.dataset == "tinyimagenet":
        notify(
            "TinyImageNet class names need tiny-imagenet-200/wnids.txt and words.txt under --data-root: using numbers"
        )
    return names


def class_index(value: str, names: list[str] | None, num_classes: int) -> int:
    """``--label``'s class: a class name, else a class number; anything else is a CarsoError."""
    if names is not None and value in names:
        return names.index(value)
    if value.strip().isdigit() and int(value) < num_classes:
        return int(value)
    known = f"a class name ({', '.join(names[:5])}{', …' if len(names) > 5 else ''}) or " if names else ""
    raise CarsoError(f"--label {value!r} is not a class of this run: give {known}a number from 0 to {num_classes - 1}")


def true_classes(paths: list[Path], names: list[str] | None, given: str | None, num_classes: int) -> list[int | None]:
    """Each image's true class: ``--label`` for all, else its folder's name when that is a class name."""
    if given is not None:
        return [class_index(given, names, num_classes)] * len(paths)
    return [names.index(p.parent.name) if names is not None and p.parent.name in names else None for p in paths]
