"""Issue 22.3: text from the user, the file system or a library is printed as it is, never read as rich
markup. A name like ``shot[/a].png`` used to end in a ``MarkupError`` traceback, ``img[red].png`` lost
its ``[red]``, and gloo's ``[/__w/pytorch/…/pair.cc:545]`` did the same on rank 0 after a peer died."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from carso_cli.cli import app
from carso_cli.commands import predict

runner = CliRunner()
BRACKETED = ["shot[/a].png", "img[red].png", "x[bold]y[/bold].png"]
# 32 examples in batches of 16, 1 epoch: a training of a few seconds.
TINY = ["data.synthetic_train_size=32", "training.batch_size=16", "training.epochs=1", "attacks.pgd_steps=1"]


def flat(text: str) -> str:
    return " ".join(text.split())


def assert_clean(result, code: int) -> None:
    assert result.exit_code == code, (result.exception, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "MarkupError" not in result.output


@pytest.mark.parametrize("name", BRACKETED)
def test_missing_image_with_brackets(tiny_run: Path, tmp_path: Path, name: str) -> None:
    missing = tmp_path / name
    result = runner.invoke(app, ["predict", str(missing), "--run", str(tiny_run)])
    assert_clean(result, 1)
    assert str(missing) in flat(result.output)


@pytest.mark.parametrize("name", BRACKETED)
def test_image_with_brackets_is_named_whole(
    tiny_run: Path, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # short relative names: the table's image column is not cut
    image = Path(name)  # "shot[/a].png" is the file "a].png" in the folder "shot["
    image.parent.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image, format="PNG")
    grid = Path("grids") / name
    grid.parent.mkdir(parents=True, exist_ok=True)
    result = runner.invoke(
        app, ["predict", str(image), "--run", str(tiny_run), "--samples", "2", "--save-reconstructions", str(grid)]
    )
    assert_clean(result, 0)
    assert name in result.output and f"wrote {grid}" in flat(result.output)


def test_missing_classifier_with_brackets(tmp_path: Path) -> None:
    weights = tmp_path / "w[/x].safetensors"
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
        ],
    )
    assert_clean(result, 1)
    assert f"--classifier: file not found: {weights}" in flat(result.output)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_library_error_with_brackets(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What gloo raised on rank 0 when its peer died: an internal error, shown whole."""
    text = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Connection closed by peer"

    def fails(*args, **kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(predict, "run", fails)
    result = runner.invoke(app, ["predict", str(tmp_path), "--run", str(tiny_run)])
    assert_clean(result, 1)
    assert f"internal error: RuntimeError: {text}" in flat(result.output)


def test_training_output_with_brackets(tmp_path: Path, classifier_file: Path) -> None:
    """A preset named with brackets (progress bars) and a run directory with brackets (every line)."""
    preset = tmp_path / "p.toml"
    preset.write_text('extends = "smoke"\nname = "sm[/oke]"\n')
    out = tmp_path / "run[red]"
    args = [
        "train-purifier",
        "--classifier",
        str(classifier_file),
        "--out",
        str(out),
        "--device",
        "cpu",
        *[a for s in TINY for a in ("--set", s)],
    ]
    result = runner.invoke(app, [*args, "--preset", str(preset)])
    assert_clean(result, 0)
    assert f"purifier trained: {out / 'purifier.safetensors'}" in flat(result.output)
    result = runner.invoke(app, [*args, "--resume", "--epochs", "2"])
    assert_clean(result, 0)
    assert f"(of 2 epochs): {out}" in flat(result.output)
