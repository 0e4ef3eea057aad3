"""``carso predict``: reading images, JSON and table output, reconstructions grid, errors; class names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_random_run
from PIL import Image
from typer.testing import CliRunner

from carso_cli import prediction
from carso_cli.api import example_latents
from carso_cli.classnames import CIFAR10_CLASSES, CIFAR100_CLASSES, class_names, label
from carso_cli.cli import app
from carso_cli.config import load_config
from carso_cli.images import collect_images, load_image
from carso_cli.models import load_run

runner = CliRunner()


def _write(path: Path, shape: tuple[int, ...], seed: int = 0, dtype=np.uint8, high: int = 256) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, high, shape).astype(dtype)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder with two 32×32 RGB images (the smoke model's input)."""
    folder = tmp_path / "images"
    _write(folder / "a.png", (32, 32, 3), seed=1)
    _write(folder / "b.jpg", (32, 32, 3), seed=2)
    return folder


def _predict(*args: str):
    return runner.invoke(app, ["predict", *args])


def _json(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout holds the JSON and nothing else


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def test_json_schema_and_probabilities(tiny_run: Path, images: Path) -> None:
    out = _json(_predict(str(images), "--run", str(tiny_run), "--json", "--samples", "3"))
    assert [o["image"] for o in out] == [str(images / "a.png"), str(images / "b.jpg")]
    for o in out:
        assert set(o) == {"image", "class", "label", "probabilities"}
        p = o["probabilities"]
        assert len(p) == 10 and all(0.0 <= v <= 1.0 for v in p)
        assert sum(p) == pytest.approx(1.0, abs=1e-6)
        assert o["class"] == int(np.argmax(p)) and o["label"] == str(o["class"])  # synthetic: the numbers


def test_carso_probabilities_are_the_models_and_do_not_depend_on_batching(tiny_run: Path, images: Path) -> None:
    one = _json(_predict(str(images), "--run", str(tiny_run), "--json", "--batch-size", "1", "--seed", "5"))
    two = _json(_predict(str(images), "--run", str(tiny_run), "--json", "--batch-size", "2", "--seed", "5"))
    for a, b in zip(one, two):
        np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=0, atol=1e-6)
    # The same numbers straight from the model, with the per-image latents of seed 5.
    loaded = load_run(tiny_run)
    model = loaded.carso()
    x = torch.stack([load_image(p, 32).pixels for p in sorted(images.iterdir())]).float() / 255
    z = example_latents(5, range(2), model.samples, loaded.purifier.spec.fjoint)
    with torch.no_grad():
        expected = model.predict_proba(x, z)
    np.testing.assert_allclose([o["probabilities"] for o in one], expected.numpy(), rtol=0, atol=1e-6)
    # Image i's latents depend on (seed, i) only.
    assert torch.equal(example_latents(5, range(0, 3), 4, 6)[:, 2], example_latents(5, range(2, 3), 4, 6)[:, 0])
    assert not torch.equal(example_latents(5, range(1), 4, 6), example_latents(6, range(1), 4, 6))


def test_classifier_only_is_the_classifiers_softmax(tiny_run: Path, images: Path) -> None:
    out = _json(_predict(str(images / "a.png"), "--run", str(tiny_run), "--json", "--classifier-only"))
    loaded = load_run(tiny_run)
    x = load_image(images / "a.png", 32).pixels.float().unsqueeze(0) / 255
    with torch.no_grad():
        expected = torch.softmax(loaded.classifier(x), dim=-1)[0]
    np.testing.assert_allclose(out[0]["probabilities"], expected.numpy(), rtol=0, atol=1e-6)
    carso = _json(_predict(str(images / "a.png"), "--run", str(tiny_run), "--json"))
    assert carso[0]["probabilities"] != out[0]["probabilities"]


def test_table_shows_top_k_with_class_names(tmp_path: Path, images: Path) -> None:
    run = make_random_run(tmp_path / "runs" / "cifar-like", load_config("smoke", {"data.dataset": "cifar10"}))
    result = _predict(
        str(images / "a.png"), "--run", str(run), "--top-k", "4", "--samples", "0", "--aggregation", "logit"
    )
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "│" in line]
    assert len(rows) == 4 and sum(name in result.stdout for name in CIFAR10_CLASSES) >= 4
    assert "1 deterministic reconstruction" in result.stdout and "logit aggregation" in result.stdout


def test_default_run_is_the_latest_under_runs(tiny_run: Path, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_run.parent.parent)  # tiny_run = <tmp>/runs/smoke-tiny
    result = _predict(str(images / "a.png"))
    assert result.exit_code == 0, result.output
    assert "smoke-tiny" in result.stdout


# ----------------------------------------------------------------------------------------------
# Inputs: conversions, resizing, folders
# ----------------------------------------------------------------------------------------------


def test_grayscale_rgba_and_other_sizes_are_converted_and_reported(tiny_run: Path, tmp_path: Path) -> None:
    gray = _write(tmp_path / "gray.png", (32, 32))
    rgba = tmp_path / "clear.png"
    Image.new("RGBA", (32, 32), (10, 200, 30, 0)).save(rgba)  # fully transparent
    big = _write(tmp_path / "big.png", (64, 48, 3))  # 48 wide, 64 high
    deep = _write(tmp_path / "deep.png", (32, 32), dtype=np.uint16, high=65536)

    g = load_image(gray, 32)
    assert g.pixels.shape == (3, 32, 32) and torch.equal(g.pixels[0], g.pixels[2])
    assert g.notes == ["converted grayscale to RGB"]
    r = load_image(rgba, 32)
    assert torch.all(r.pixels == 255) and "transparent areas on white" in r.notes[0]
    b = load_image(big, 32)
    assert b.pixels.shape == (3, 32, 32)
    assert b.notes == ["centre-cropped 48×64 to 48×48", "resized 48×48 to 32×32"]
    d = load_image(deep, 32)  # 16-bit values scaled to 8 bits, not clipped to white
    expected = np.rint(np.asarray(Image.open(deep), dtype=np.float64) / 65535 * 255)
    np.testing.assert_array_equal(d.pixels[0].numpy(), expected)

    result = _predict(str(gray), str(rgba), str(big), "--run", str(tiny_run), "--json", "--samples", "1")
    assert len(_json(result)) == 3
    assert "gray.png: converted grayscale to RGB" in result.stderr
    assert "big.png: resized 48×48 to 32×32" in result.stderr
    assert "clear.png: converted RGBA to RGB" in result.stderr


def test_folder_input_finds_images_only(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    _write(folder / "cat" / "2.png", (8, 8, 3))
    _write(folder / "cat" / "1.JPG", (8, 8, 3))
    _write(folder / "dog" / "x.bmp", (8, 8, 3))
    _write(folder / ".cache" / "hidden.png", (8, 8, 3))
    (folder / "notes.txt").write_text("not an image")
    single = _write(tmp_path / "single.webp", (8, 8, 3))
    found = collect_images([folder, single])
    assert found == [folder / "cat" / "1.JPG", folder / "cat" / "2.png", folder / "dog" / "x.bmp", single]


@pytest.mark.parametrize(("samples", "columns"), [(3, 4), (0, 2)])
def test_reconstruction_grid(tiny_run: Path, images: Path, tmp_path: Path, samples: int, columns: int) -> None:
    grid = tmp_path / "out" / "grid.png"
    result = _predict(
        str(images), "--run", str(tiny_run), "--samples", str(samples), "--save-reconstructions", str(grid)
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in grid.parent.iterdir()] == ["grid.png"]  # no temporary file left
    drawn = prediction.run([images], tiny_run, samples=samples, save_reconstructions=grid).grid
    assert drawn is not None and drawn.scale == 4 and drawn.tile_px == 128  # 32×32 at 4×: ≥ 128 px each
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.size == drawn.size
        pixels = np.asarray(img.convert("RGB"))
    assert len(drawn.boxes) == 2 and all(len(row) == columns for row in drawn.boxes)  # input + reconstructions
    for b, path in enumerate(sorted(images.iterdir())):  # the input, nearest-upscaled, where the grid says
        left, top = drawn.boxes[b][0]
        expected = np.kron(load_image(path, 32).pixels.permute(1, 2, 0).numpy(), np.ones((4, 4, 1), dtype=np.uint8))
        assert np.array_equal(pixels[top : top + 128, left : left + 128], expected)


def test_grid_captions_name_the_true_class_carso_and_each_reconstruction(tmp_path: Path) -> None:
    from test_classnames import imagefolder_cfg, make_imagefolder

    data = make_imagefolder(tmp_path / "pets")
    run = make_random_run(tmp_path / "run", imagefolder_cfg(data, {"inference.samples": 3}))
    files = [data / "val" / "cat" / "0.png", data / "val" / "dog" / "1.png"]
    result = prediction.run(files, run, save_reconstructions=tmp_path / "g.png")
    loaded = load_run(run)
    model = loaded.carso()
    x = torch.stack([load_image(p, 32).pixels for p in files]).float() / 255
    with torch.no_grad():
        logits = model.reconstruction_logits(x, example_latents(0, range(2), 3, loaded.purifier.spec.fjoint))
    assert result.grid is not None
    for b, (truth, pred) in enumerate(zip(("cat", "dog"), result.predictions)):
        caption = result.grid.captions[b]
        assert caption[0] == ["input", f"true: {truth}", f"CARSO: {pred.label}"]
        assert pred.true_label == truth and pred.label == ("cat", "dog")[pred.cls]
        assert [c[1] for c in caption[1:]] == [f"→ {('cat', 'dog')[int(k)]}" for k in logits[:, b].argmax(-1)]

    # --label overrides the folder; --attack pgd adds the attacked input and the classifier's classes.
    attacked = prediction.run(files[:1], run, save_reconstructions=tmp_path / "a.png", label_="dog", attack="pgd")
    pred = attacked.predictions[0]
    assert pred.true_label == "dog" and pred.attack is not None and pred.attack["name"] == "pgd"
    assert attacked.grid is not None
    clean, adv, *recons = attacked.grid.captions[0]
    names = ("cat", "dog")
    assert clean == ["clean input", "true: dog", f"classifier: {names[pred.attack['classifier_clean']]}"]
    assert adv == ["PGD, ε = 8/255", f"classifier: {names[pred.attack['classifier_attacked']]}", f"CARSO: {pred.label}"]
    assert len(recons) == 3


def test_label_and_attack_through_the_cli(tmp_path: Path, images: Path) -> None:
    from test_classnames import imagefolder_cfg, make_imagefolder

    data = make_imagefolder(tmp_path / "pets")
    run = make_random_run(tmp_path / "run", imagefolder_cfg(data, {"inference.samples": 2}))
    out = _json(_predict(str(data / "val"), "--run", str(run), "--json", "--attack", "pgd"))
    assert [o["true_label"] for o in out] == ["cat"] * 4 + ["dog"] * 4  # from the folder names
    assert all(o["attack"]["eps"] == pytest.approx(8 / 255) for o in out)
    one = _json(_predict(str(data / "val"), "--run", str(run), "--json", "--attack", "pgd", "--batch-size", "3"))
    np.testing.assert_allclose([o["probabilities"] for o in one], [o["probabilities"] for o in out], rtol=0, atol=1e-6)
    given = _json(_predict(str(images / "a.png"), "--run", str(run), "--json", "--label", "1"))
    assert given[0]["true_class"] == 1 and given[0]["true_label"] == "dog"
    _fails(_predict(str(images / "a.png"), "--run", str(run), "--attack", "pgd"), "needs each image's true class")
    _fails(_predict(str(images / "a.png"), "--run", str(run), "--label", "bird"), "--label 'bird' is not a class")
    _fails(_predict(str(images / "a.png"), "--run", str(run), "--label", "7"), "a number from 0 to 1")


# ----------------------------------------------------------------------------------------------
# Errors: one clear line, non-zero exit, no traceback
# ----------------------------------------------------------------------------------------------


def _fails(result, message: str) -> None:
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


def test_errors(tiny_run: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = ["--run", str(tiny_run)]
    _fails(_predict(str(tmp_path / "missing.png"), *run), "no such file or folder")
    text = tmp_path / "fake.png"
    text.write_text("this is not a PNG")
    _fails(_predict(str(text), *run), "cannot read")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((images / "a.png").read_bytes()[:200])
    _fails(_predict(str(truncated), *run, "--json"), "cannot read")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    _fails(_predict(str(tmp_path / "empty"), *run), "folder without images")
    _fails(_predict(str(images), "--run", str(tmp_path / "empty")), "not a carso run directory")
    _fails(_predict(str(images), "--run", str(tmp_path / "nowhere")), "run directory not found")
    monkeypatch.chdir(tmp_path / "empty")
    _fails(_predict(str(images)), "no run directory")
    _fails(
        _predict(str(images), *run, "--classifier-only", "--save-reconstructions", "g.png"),
        "--save-reconstructions needs the purifier",
    )
    _fails(_predict(str(images), *run, "--save-reconstructions", "g.unknownformat"), "cannot tell the image format")


# ----------------------------------------------------------------------------------------------
# Class names
# ----------------------------------------------------------------------------------------------


def test_class_names(tmp_path: Path) -> None:
    assert len(CIFAR10_CLASSES) == len(set(CIFAR10_CLASSES)) == 10
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)  # torchvision's (alphabetical) order
    assert class_names("cifar10")[3] == "cat" and class_names("cifar100")[99] == "worm"
    assert class_names("synthetic") is None and label(None, 7) == "class 7"
    assert class_names("tinyimagenet", tmp_path) is None  # not downloaded
    root = tmp_path / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("n02124075\nn01443537\nn09999999\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\n")
    # ImageFolder's order: sorted WordNet ids; first synonym; an id without words keeps the id.
    assert class_names("tinyimagenet", tmp_path) == ["goldfish", "Egyptian cat", "n09999999"]


def test_aggregation_choices_are_the_librarys() -> None:
    from carso_cli.aggregation import AGGREGATIONS
    from carso_cli.commands.predict import Aggregation

    assert [a.value for a in Aggregation] == list(AGGREGATIONS)
