"""Adversarial examples in and out: ``carso_cli.adversarial`` and ``carso eval --adversarial FILE``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_random_run
from safetensors.torch import save_file
from typer.testing import CliRunner

import carso_cli
import carso_cli.checkpoint
from carso_cli.adversarial import load_adversarial, save_adversarial
from carso_cli.cli import app
from carso_cli.data import build_dataset
from carso_cli.evaluation import autoattack_flags, classifier_flags, load_examples

runner = CliRunner()
N = 8


def _eval(run: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(
        app, ["eval", "--run", str(run), "--device", "cpu", "--repeats", "2", "--no-indicators", *args]
    )
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An untrained smoke run and APGD-CE examples (2 steps) against its classifier (fast, not realistic:
    what matters here is that flags survive the file round trip)."""
    run = make_random_run(tmp_path_factory.mktemp("adv") / "run")
    classifier = carso_cli.load_classifier(run)
    eps = classifier.config.attacks.eps
    x, y = load_examples(build_dataset(classifier.config, "test", root="data"), range(N))
    res = autoattack_flags(
        classifier, x, y, eps=eps, version="custom", attacks=["apgd-ce"], seed=0, device=torch.device("cpu"), steps=2
    )
    robust = res.flags & classifier_flags(classifier, x, y)
    path = save_adversarial(run / "aa.safetensors", y, torch.arange(N), {"apgd-ce": (res.x_adv, robust)}, eps)
    return {"run": run, "x": x, "y": y, "x_adv": res.x_adv, "robust": robust, "eps": eps, "path": path}


def _results(run: Path, name: str) -> dict:
    return json.loads((run / "eval" / name / "results.json").read_text())


def test_saved_examples_re_evaluate_to_the_same_robust_count(attacked: dict) -> None:
    run, path = attacked["run"], attacked["path"]
    (only,) = load_adversarial(path)
    assert (
        only.attack == "apgd-ce" and torch.equal(only.x_adv, attacked["x_adv"]) and only.idx.tolist() == list(range(N))
    )
    code, out = _eval(run, "--adversarial", str(path), "--name", "again")
    assert code == 0, out
    r = _results(run, "again")
    assert r["metrics"]["AT/apgd-ce"]["correct"] == int(attacked["robust"].sum())
    assert r["flags"]["classifier.apgd-ce"] == attacked["robust"].int().tolist()
    # CARSO on the same (transferred) examples: one verdict per example and the re-classification report.
    assert r["metrics"]["C/apgd-ce"]["total"] == N
    assert r["reclassification"]["apgd-ce"]["repeats"] == 2
    assert "AT/apgd-ce" in out and "C/apgd-ce" in out


def test_pt_file_of_another_tool_is_accepted(attacked: dict, tmp_path: Path) -> None:
    path = tmp_path / "theirs.pt"
    torch.save({"x_adv": attacked["x_adv"], "y": attacked["y"], "idx": torch.arange(N)}, path)
    code, out = _eval(attacked["run"], "--adversarial", str(path), "--target", "classifier", "--name", "pt")
    assert code == 0, out
    assert _results(attacked["run"], "pt")["metrics"]["AT/theirs"]["correct"] == int(attacked["robust"].sum())


def test_one_example_beyond_eps_is_refused_with_count_and_distance(attacked: dict, tmp_path: Path) -> None:
    x, x_adv, eps = attacked["x"], attacked["x_adv"].clone(), attacked["eps"]
    pixel = x[3, 0, 0, 0]
    x_adv[3, 0, 0, 0] = pixel + eps + 0.01 if pixel + eps + 0.01 <= 1 else pixel - eps - 0.01
    path = tmp_path / "far.safetensors"
    save_adversarial(path, attacked["y"], torch.arange(N), {"far": (x_adv, attacked["robust"])}, eps)
    code, out = _eval(attacked["run"], "--adversarial", str(path), "--name", "far")
    assert code == 1 and "Traceback" not in out
    assert "1 example(s) lie beyond ε" in out and f"distance {eps + 0.01:.4g}" in out and "nothing evaluated" in out
    assert not (attacked["run"] / "eval" / "far").exists()


def _bad(tmp_path: Path, **tensors: torch.Tensor) -> Path:
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("shape", "x_adv has shape (8, 3, 8, 8)"),
        ("range", "outside [0, 1]"),
        ("nan", "1 example(s) contain NaN"),
        ("labels", "labels outside"),
        ("no_y", "has no 'y'"),
        ("idx_labels", "label(s) differ from the test set"),
    ],
)
def test_bad_files_are_refused(attacked: dict, tmp_path: Path, case: str, message: str) -> None:
    x, y = attacked["x_adv"].clone(), attacked["y"].clone()
    tensors = {"x_adv": x, "y": y}
    if case == "shape":
        tensors["x_adv"] = torch.zeros(N, 3, 8, 8)
    elif case == "range":
        tensors["x_adv"] = x * 255
    elif case == "nan":
        x[5, 0, 1, 1] = float("nan")
    elif case == "labels":
        y[0] = 99
    elif case == "no_y":
        del tensors["y"]
    elif case == "idx_labels":
        tensors["idx"] = torch.arange(N).flip(0)
        tensors["y"] = torch.arange(N) % 10  # not the test set's labels at those indices
    code, out = _eval(attacked["run"], "--adversarial", str(_bad(tmp_path, **tensors)), "--name", "bad")
    assert code == 1 and "Traceback" not in out and "internal error" not in out
    assert message in out, out
    assert not (attacked["run"] / "eval" / "bad").exists()


def test_pt_file_that_is_not_tensors_is_refused(attacked: dict, tmp_path: Path) -> None:
    path = tmp_path / "code.pt"
    torch.save({"x_adv": attacked["x_adv"], "y": attacked["y"], "note": object()}, path)  # needs unpickling code
    code, out = _eval(attacked["run"], "--adversarial", str(path))
    assert code == 1 and "not a readable .pt file" in out and "Traceback" not in out


def test_eval_save_adversarial_then_adversarial_gives_the_same_robust_count(attacked: dict, tmp_path: Path) -> None:
    """``carso eval --save-adversarial A`` then ``carso eval --adversarial A``: the same robust count."""
    run = attacked["run"]
    saved = tmp_path / "A.safetensors"
    code, out = _eval(
        run,
        "--target",
        "classifier",
        "--attack",
        "autoattack",
        "--n-examples",
        str(N),
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--name",
        "saved",
        "--save-adversarial",
        str(saved),
    )
    assert code == 0, out
    first = _results(run, "saved")
    (aa,) = load_adversarial(saved)
    assert aa.attack == "classifier_aa" and aa.x_adv.shape[0] == N and aa.idx.tolist() == list(range(N))
    stored = carso_cli.checkpoint.load_tensors(saved)[0]["flags.classifier_aa"]
    assert stored.int().tolist() == first["flags"]["classifier_aa"]
    code, out = _eval(run, "--target", "classifier", "--adversarial", str(saved), "--name", "reloaded")
    assert code == 0, out
    again = _results(run, "reloaded")
    assert again["metrics"]["AT/classifier_aa"]["correct"] == first["metrics"]["AT/AA"]["correct"]


def test_adversarial_file_goes_through_the_runner_lock_store_and_resume(attacked: dict) -> None:
    """``--adversarial`` is an attack source of the runner: per-batch results, --resume, the settings stored."""
    run, path = attacked["run"], attacked["path"]
    code, out = _eval(run, "--adversarial", str(path), "--name", "runner", "--batch-size", "4")
    assert code == 0, out
    folder = run / "eval" / "runner"
    assert sorted(p.name for p in folder.glob("batch-*.json")) == ["batch-00000.json", "batch-00001.json"]
    r = _results(run, "runner")
    assert r["settings"]["attack"] == "file" and r["settings"]["adversarial_file"] == str(path)
    assert len(r["settings"]["adversarial_sha256"]) == 64
    code, again = _eval(run, "--adversarial", str(path), "--name", "runner", "--batch-size", "4", "--resume")
    assert code == 0 and "is complete" in again, again
    (folder / "batch-00001.json").unlink()
    (folder / "results.json").unlink()
    code, again = _eval(run, "--adversarial", str(path), "--name", "runner", "--batch-size", "4", "--resume")
    assert code == 0 and "resumed: 1 batch(es) found on disk, 1 computed" in again, again
    assert _results(run, "runner")["flags"] == r["flags"]
