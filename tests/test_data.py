"""Datasets and loaders: synthetic data, fake TinyImageNet / image-folder trees, CIFAR offline errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from carso_cli.config import Config, load_config
from carso_cli.data import (
    SyntheticDataset,
    build_dataset,
    dataset_class_names,
    make_loader,
    train_augmentation,
)
from carso_cli.errors import DataError

CPU = torch.device("cpu")


def stack(ds, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(ds) if n is None else n
    items = [ds[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


# --------------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_balanced_and_in_range() -> None:
    start = time.perf_counter()
    a = SyntheticDataset(2000, image_size=32, num_classes=10, seed=0, split="train")
    assert time.perf_counter() - start < 1.0  # vectorised generation
    b = SyntheticDataset(2000, image_size=32, num_classes=10, seed=0, split="train")
    assert torch.equal(a.images, b.images) and a.labels == b.labels
    assert not torch.equal(SyntheticDataset(2000, seed=1).images, a.images)
    assert not torch.equal(SyntheticDataset(2000, split="test").images, a.images)
    x, y = a[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.05
    assert torch.bincount(torch.tensor(a.labels), minlength=10).tolist() == [200] * 10
    grey = SyntheticDataset(30, image_size=16, num_classes=3, channels=1)
    assert grey[0][0].shape == (1, 16, 16)


@pytest.fixture
def one_thread():
    """Tiny matrix products run fastest on one thread (with two, a busy machine makes them ~10× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_synthetic_is_learnable_but_noisy(one_thread) -> None:
    """A linear classifier trained for a second clearly beats chance (10%), but is far from perfect."""
    train = SyntheticDataset(2000, seed=0, split="train")
    test = SyntheticDataset(500, seed=0, split="test")
    x, y = train.images.float().div(255).flatten(1), torch.tensor(train.labels)
    x_test, y_test = test.images.float().div(255).flatten(1), torch.tensor(test.labels)
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _step in range(150):
        idx = torch.randint(0, len(x), (128,))
        loss = F.cross_entropy(model(x[idx] - 0.5), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(x_test - 0.5).argmax(1) == y_test).float().mean().item()
    assert 0.35 < accuracy < 0.95


def test_build_dataset_synthetic_from_the_smoke_preset(smoke_cfg: Config) -> None:
    train = build_dataset(smoke_cfg, "train")
    test = build_dataset(smoke_cfg, "test")
    assert len(train) == smoke_cfg.data.synthetic_train_size and len(test) == smoke_cfg.data.synthetic_test_size
    assert torch.equal(build_dataset(smoke_cfg, "val")[3][0], test[3][0])
    # Augmentation only ever applies to the training split.
    assert build_dataset(smoke_cfg, "test", augment=True).transform is None
    from torchvision.transforms import v2

    steps = build_dataset(smoke_cfg, "train", augment=True).transform.transforms  # torchvision's, not ours
    assert [type(t) for t in steps] == [v2.RandomCrop, v2.RandomHorizontalFlip]
    assert steps[0].padding == [smoke_cfg.data.crop_padding] * 4
    with pytest.raises(DataError, match="split"):
        build_dataset(smoke_cfg, "holdout")


def test_augmentation_is_a_padded_crop_or_flip_of_the_image() -> None:
    x = torch.rand(3, 8, 8)
    torch.manual_seed(0)
    aug = train_augmentation(2, 8)
    seen = set()
    for _ in range(40):
        out = aug(x)
        assert out.shape == x.shape
        padded = F.pad(x, (2, 2, 2, 2))
        windows = [padded[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        matches = [(k, f) for k, w in enumerate(windows) for f in (0, 1) if torch.equal(out, w.flip(-1) if f else w)]
        assert matches
        seen.update(matches)
    assert len(seen) > 10 and {f for _, f in seen} == {0, 1}  # it does crop and flip at random


def test_make_loader_shuffles_reproducibly(smoke_cfg: Config) -> None:
    ds = SyntheticDataset(100, image_size=8, num_classes=4)

    def order(seed: int) -> list[int]:
        loader = make_loader(ds, 32, shuffle=True, device=CPU, seed=seed)
        return torch.cat([y for _, y in loader]).tolist()

    assert order(1) == order(1) and order(1) != order(2)
    loader = make_loader(ds, 32, shuffle=False, device=CPU, drop_last=True)
    batches = list(loader)
    assert len(batches) == 3 and batches[0][0].shape == (32, 3, 8, 8) and batches[0][1].dtype == torch.int64
    assert not loader.pin_memory


# --------------------------------------------------------------------------------------------------
# Files on disk (fake trees; nothing is downloaded)
# --------------------------------------------------------------------------------------------------


def write_image(path: Path, colour: tuple[int, int, int], size: int = 8, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    value = colour if mode == "RGB" else colour[0]
    Image.new(mode, (size, size), value).save(path)


def preset_for(dataset: str, num_classes: int, image_size: int = 32) -> Config:
    cfg = load_config("smoke")
    cfg.data.dataset, cfg.data.num_classes, cfg.data.image_size = dataset, num_classes, image_size
    return cfg


@pytest.fixture
def tiny_imagenet(tmp_path: Path) -> Path:
    """root/tiny-imagenet-200 with 3 classes (wnids.txt deliberately unsorted), 2 train + 1 val image each."""
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tlion\nn03\tbus, coach\nn99\tother\n")
    lines = []
    for k, wnid in enumerate(sorted(wnids)):
        colour = (40 * (k + 1), 0, 0)
        write_image(base / "train" / wnid / "images" / f"{wnid}_0.JPEG", colour, size=64)
        write_image(base / "train" / wnid / "images" / f"{wnid}_1.JPEG", colour, size=50, mode="L")
        write_image(base / "val" / "images" / f"val_{k}.JPEG", colour, size=64)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_tinyimagenet_layout(tiny_imagenet: Path) -> None:
    cfg = preset_for("tinyimagenet", 3)
    train = build_dataset(cfg, "train", root=tiny_imagenet, download=False)
    val = build_dataset(cfg, "val", root=tiny_imagenet, download=False)
    assert len(train) == 6 and len(val) == 3
    # Labels follow the sorted WordNet ids, like ImageFolder and the class names.
    assert sorted(y for _, y in (train[i] for i in range(6))) == [0, 0, 1, 1, 2, 2]
    x, y = val[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32  # 64×64 JPEG resized to the preset size
    assert y == 1 and x[0].mean().item() == pytest.approx(80 / 255, abs=0.02)
    grey = train[1][0]  # a grey 50×50 image → 3 channels, 32×32
    assert grey.shape == (3, 32, 32) and torch.allclose(grey[0], grey[1])
    assert dataset_class_names(cfg, tiny_imagenet) == ["goldfish", "lion", "bus"]


def test_tinyimagenet_errors(tiny_imagenet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="has 3 classes.*num_classes = 200"):
        build_dataset(preset_for("tinyimagenet", 200), "train", root=tiny_imagenet, download=False)
    empty = tmp_path / "empty"
    with pytest.raises(DataError, match=r"tiny-imagenet-200.*wnids\.txt"):
        build_dataset(preset_for("tinyimagenet", 3), "train", root=empty, download=False)

    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="could not be downloaded from http://cs231n"):
        build_dataset(preset_for("tinyimagenet", 3), "train", root=empty, download=True)


def test_imagefolder(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for k, name in enumerate(["cat", "dog"]):
            write_image(tmp_path / split / name / "a.png", (0, 100 * k, 50), size=40)
            write_image(tmp_path / split / name / "b.png", (0, 100 * k, 50), size=32)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    cfg = preset_for(f"imagefolder:{tmp_path}", 2)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert len(train) == 4 and len(test) == 4
    x, y = test[3]
    assert x.shape == (3, 32, 32) and y == 1
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, 100 / 255, 50 / 255]))
    assert dataset_class_names(cfg) == ["cat", "dog"]
    with pytest.raises(DataError, match="has 2 classes.*num_classes = 10"):
        build_dataset(preset_for(f"imagefolder:{tmp_path}", 10), "train")
    with pytest.raises(DataError, match="missing .*val"):
        build_dataset(preset_for(f"imagefolder:{tmp_path / 'nowhere'}", 2), "test")
    (tmp_path / "val" / "bird").mkdir()
    write_image(tmp_path / "val" / "bird" / "c.png", (1, 2, 3))
    with pytest.raises(DataError):
        build_dataset(preset_for(f"imagefolder:{tmp_path}", 3), "test")  # val's classes differ from train's


def test_cifar_absent_and_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = preset_for("cifar10", 10)
    with pytest.raises(DataError, match=r"cifar10 not found under .*cifar-10-batches-py.*downloading is off"):
        build_dataset(cfg, "train", root=tmp_path, download=False)

    from torchvision import datasets

    def offline(self) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets.CIFAR100, "download", offline)
    with pytest.raises(DataError, match=r"could not be downloaded \(OSError: network is unreachable\)"):
        build_dataset(preset_for("cifar100", 100), "test", root=tmp_path, download=True)
    with pytest.raises(DataError, match="num_classes = 100"):
        build_dataset(preset_for("cifar10", 100), "test", root=tmp_path, download=False)
