"""Run files as collaborators and schedulers meet them (issue 22): written with the permissions an
ordinary ``open()`` gives (0666 minus the umask, not mkstemp's 0600), and ``--resume`` of a finished run
succeeds and does nothing (a requeued job reruns its script, ``--resume`` included)."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from carso_cli import checkpoint as ckpt
from carso_cli.cli import app
from carso_cli.commands import train_classifier as tc

runner = CliRunner()


def sets(overrides):
    return [a for s in overrides for a in ("--set", s)]


# 32 examples in batches of 16: 2 steps, 1 epoch.
PURIFIER = sets(["data.synthetic_train_size=32", "training.batch_size=16", "training.epochs=1", "attacks.pgd_steps=1"])
CLASSIFIER = sets(
    [
        "data.synthetic_train_size=32",
        "data.synthetic_test_size=20",
        "classifier_training.batch_size=16",
        "classifier_training.epochs=1",
        "classifier_training.adversarial=none",
    ]
)
EVAL = ["--attack", "none", "--target", "classifier", "--n-examples", "2", "--batch-size", "2", "--device", "cpu"]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def carso(*args: str, mask: int = 0o022) -> str:
    """The CLI (in this process) under this umask; its output, once it succeeded."""
    with umask(mask):
        result = runner.invoke(app, list(args))
    assert result.exit_code == 0, (result.exception, result.output[-3000:])
    return result.output


def files(folder: Path) -> dict[Path, tuple[int, int, bytes]]:
    """Every file under ``folder`` (locks included): (mode, mtime, bytes)."""
    return {
        p: (stat.S_IMODE(p.stat().st_mode), p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def finish(mask: int, classifier_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """A finished purifier run, classifier training and evaluation, all made under one umask."""
    root = tmp_path_factory.mktemp(f"umask{mask:03o}")
    carso(
        "train-purifier",
        "--preset",
        "smoke",
        "--classifier",
        str(classifier_file),
        "--out",
        str(root / "run"),
        "--device",
        "cpu",
        *PURIFIER,
        mask=mask,
    )
    carso(
        "train-classifier",
        "--preset",
        "smoke",
        "--out",
        str(root / "cls" / "w.safetensors"),
        "--device",
        "cpu",
        *CLASSIFIER,
        mask=mask,
    )
    carso("eval", "--run", str(root / "run"), *EVAL, mask=mask)
    return mask, root


@pytest.fixture(scope="module")
def finished(classifier_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    return finish(0o022, classifier_file, tmp_path_factory)


@pytest.fixture(scope="module")
def finished_002(classifier_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    return finish(0o002, classifier_file, tmp_path_factory)


@pytest.mark.parametrize("made", ["finished", "finished_002"])
def test_files_have_the_permissions_open_gives(made: str, request: pytest.FixtureRequest) -> None:
    umask, root = request.getfixturevalue(made)
    written = files(root)
    names = {p.relative_to(root).as_posix() for p in written}
    assert {
        "run/config.toml",
        "run/classifier.safetensors",
        "run/classifier.json",
        "run/metrics.jsonl",
        "run/checkpoints/last.safetensors",
        "run/purifier.safetensors",
        "run/curves.png",
        "run/eval/none/results.json",
        "run/eval/none/settings.json",
        "cls/w.safetensors",
        "cls/w.state.safetensors",
        "cls/w.config.toml",
        "cls/w.metrics.jsonl",
    } <= names, names
    modes = {p.relative_to(root).as_posix(): oct(mode) for p, (mode, _, _) in written.items()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_a_rewrite_keeps_the_mode_of_the_file(tmp_path: Path) -> None:
    """As open(path, "w") would: a file someone made group-readable only stays so when rewritten."""
    path = tmp_path / "config.toml"
    ckpt.atomic_write_text(path, "a")
    path.chmod(0o640)
    ckpt.atomic_write_text(path, "b")
    ckpt.save_tensors(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
    (tmp_path / "w.safetensors").chmod(0o600)
    ckpt.save_tensors(tmp_path / "w.safetensors", {"x": torch.ones(2)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "b"
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o600


# ----------------------------------------------------------------------------------------------------
# --resume of a finished run
# ----------------------------------------------------------------------------------------------------


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_resume_of_a_finished_purifier_run_does_nothing(
    finished: tuple[int, Path], classifier_file: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished[1] / "run", run)  # copy2: the files keep their times
    before = files(run)
    argv = [
        "train-purifier",
        "--preset",
        "smoke",
        "--classifier",
        str(classifier_file),
        "--out",
        str(run),
        "--device",
        "cpu",
        *PURIFIER,
        "--resume",
    ]
    line = one_line(carso(*argv))
    assert f"{run} is complete: 1 of 1 epochs trained" in line and "--epochs" in line
    assert files(run) == before


def test_resume_writes_what_a_finished_training_had_not_written(finished: tuple[int, Path], tmp_path: Path) -> None:
    """The last checkpoint is the final epoch's, the purifier file is missing (the disk filled up in its
    write): --resume writes it, the same as the uninterrupted run's."""
    run = tmp_path / "run"
    shutil.copytree(finished[1] / "run", run)
    (run / ckpt.PURIFIER_FILE).unlink()
    carso("train-purifier", "--resume", "--out", str(run), "--device", "cpu")
    a, _ = ckpt.load_tensors(finished[1] / "run" / ckpt.PURIFIER_FILE)
    b, _ = ckpt.load_tensors(run / ckpt.PURIFIER_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_finished_classifier_training_does_nothing(finished: tuple[int, Path], tmp_path: Path) -> None:
    shutil.copytree(finished[1] / "cls", tmp_path / "cls")
    weights = tmp_path / "cls" / "w.safetensors"
    before = files(tmp_path / "cls")
    line = one_line(
        carso(
            "train-classifier", "--preset", "smoke", "--out", str(weights), "--device", "cpu", *CLASSIFIER, "--resume"
        )
    )
    assert f"{weights} is complete: 1 of 1 epochs trained" in line
    assert files(tmp_path / "cls") == before
    assert tc.companion(weights, "state.safetensors").is_file()


def test_resume_of_a_finished_evaluation_does_nothing(finished: tuple[int, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished[1] / "run", run)
    before = files(run)
    line = one_line(carso("eval", "--run", str(run), *EVAL, "--resume"))
    assert f"{run / 'eval' / 'none'} is complete" in line
    assert files(run) == before
