"""Human-readable class names of the paper's datasets (for ``carso predict`` and reports).

CIFAR-10 and CIFAR-100 names are listed in torchvision's order (the order of the datasets' own
``batches.meta`` / ``meta`` files, i.e. the class indices every published checkpoint uses).
TinyImageNet-200 names come from the dataset's ``wnids.txt`` and ``words.txt`` when they are on disk;
their index order is the sorted WordNet ids, which is what ``torchvision.datasets.ImageFolder`` on the
``train/`` folder (and so every TinyImageNet checkpoint trained that way) assigns.
"""

from __future__ import annotations

from pathlib import Path

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
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
