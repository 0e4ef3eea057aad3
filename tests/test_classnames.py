"""Class names a run stores (``classes.json``) and what ``predict`` / ``extract`` show with them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_random_run
from PIL import Image
from typer.testing import CliRunner

from carso_cli import checkpoint as ckpt
from carso_cli.classnames import CLASSES_FILE, run_class_names, stored_class_names
from carso_cli.cli import app
from carso_cli.config import Config, load_config

runner = CliRunner()
FOLDERS = ("cat", "dog")


def make_imagefolder(root: Path, per_class: int = 4, size: int = 32) -> Path:
    """root/{train,val}/{cat,dog}/k.png: small random RGB PNGs."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in FOLDERS:
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    return root


def imagefolder_cfg(root: Path, extra: dict | None = None) -> Config:
    return load_config(
        "smoke", {"data.dataset": f"imagefolder:{root}", "data.num_classes": len(FOLDERS), **(extra or {})}
    )


def _predict_labels(run: Path, *images: Path) -> list[dict]:
    result = runner.invoke(app, ["predict", *map(str, images), "--run", str(run), "--json", "--samples", "2"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_an_imagefolder_run_keeps_its_folder_names(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "pets")
    run = make_random_run(tmp_path / "runs" / "pets", imagefolder_cfg(data))
    assert stored_class_names(run) == list(FOLDERS)
    image = tmp_path / "elsewhere.png"
    shutil.copy(data / "val" / "dog" / "0.png", image)
    shutil.rmtree(data)  # the names live in the run, not in the dataset any more
    out = _predict_labels(run, image)
    assert out[0]["label"] == FOLDERS[out[0]["class"]]
    table = runner.invoke(app, ["predict", str(image), "--run", str(run), "--top-k", "2"], env={"COLUMNS": "120"})
    assert table.exit_code == 0 and all(name in table.stdout for name in FOLDERS)
    assert "class 0" not in table.stdout and "class 1" not in table.stdout


def test_runs_without_stored_names_fall_back_as_before(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "pets")
    cifar = make_random_run(tmp_path / "runs" / "cifar", load_config("smoke", {"data.dataset": "cifar10"}))
    pets = make_random_run(tmp_path / "runs" / "pets", imagefolder_cfg(data))
    for run in (cifar, pets):
        (run / CLASSES_FILE).unlink()  # as a run written before names were stored
    image = data / "val" / "cat" / "1.png"
    from carso_cli.classnames import CIFAR10_CLASSES

    out = _predict_labels(cifar, image)
    assert out[0]["label"] == CIFAR10_CLASSES[out[0]["class"]]
    assert _predict_labels(pets, image)[0]["label"] == FOLDERS[_predict_labels(pets, image)[0]["class"]]  # from disk
    shutil.rmtree(data / "train")
    assert _predict_labels(pets, image)[0]["label"].startswith("class ")  # nothing left to name them: numbers


def test_stored_names_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    run = make_random_run(tmp_path / "run")
    assert stored_class_names(run) == [str(k) for k in range(10)]  # synthetic: the numbers
    cfg = load_config(run / ckpt.CONFIG_FILE)
    (run / CLASSES_FILE).write_text(json.dumps({"classes": ["a", "b"]}))
    notes: list[str] = []
    assert run_class_names(run, cfg, notify=notes.append) is None
    assert "2 class names found" in notes[0] and "10 classes" in notes[0]
    (run / CLASSES_FILE).write_text("not json")
    assert stored_class_names(run) is None and run_class_names(run, cfg) == [str(k) for k in range(10)]


def test_train_purifier_on_an_imagefolder_stores_the_folder_names(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "pets")
    cfg = imagefolder_cfg(data)
    weights = tmp_path / "classifier.safetensors"
    from carso_cli.models import build_classifier

    torch.manual_seed(0)
    ckpt.save_tensors(weights, build_classifier(cfg).state_dict())
    sets = [
        f"data.dataset=imagefolder:{data}",
        "data.num_classes=2",
        "training.epochs=1",
        "training.warmup_epochs=0",
        "training.plateau_epochs=1",
        "training.annealing_epochs=0",
        "training.batch_size=8",
        "training.beta_start_epoch=0",
        "training.beta_end_epoch=0",
        "training.bf16=false",
    ]
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(weights),
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            *[a for s in sets for a in ("--set", s)],
        ],
    )
    assert result.exit_code == 0, result.output
    assert stored_class_names(tmp_path / "run") == list(FOLDERS)


def test_extract_records_the_class_names(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "pets")
    run = make_random_run(tmp_path / "runs" / "pets", imagefolder_cfg(data))
    out = tmp_path / "rep.safetensors"
    result = runner.invoke(
        app, ["extract", "--run", str(run), "--out", str(out), "--n-examples", "3", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(ckpt.read_metadata(out)["class_names"]) == list(FOLDERS)


@pytest.mark.parametrize("dataset", ["cifar10", "synthetic"])
def test_write_run_stores_the_datasets_names(tmp_path: Path, dataset: str) -> None:
    run = make_random_run(tmp_path / "run", load_config("smoke", {"data.dataset": dataset}))
    from carso_cli.data import dataset_class_names

    assert stored_class_names(run) == dataset_class_names(load_config(run / ckpt.CONFIG_FILE))
