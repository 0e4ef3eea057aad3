"""Classifier sources (models/sources.py) and representation layers for any architecture (issue 21).

CPU only, nothing downloaded: RobustBench's weights are written by the test into RobustBench's cache
layout, torchvision's and timm's come from a file the test saves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import carso_cli
from carso_cli import checkpoint as ckpt
from carso_cli.cli import app
from carso_cli.commands import train_purifier
from carso_cli.config import load_config, parse_override
from carso_cli.errors import CarsoError
from carso_cli.models import build_classifier, load_run, purifier_spec_for, sources
from carso_cli.models.representation import auto_layers, candidates, resolve_layers

runner = CliRunner()
CPU = torch.device("cpu")
HERE = Path(__file__).resolve().parent

# One tiny epoch: 32 examples in batches of 16, one PGD step, the smoke purifier.
TINY = [
    "data.synthetic_train_size=32",
    "data.synthetic_test_size=8",
    "training.batch_size=16",
    "training.epochs=1",
    "training.lookahead_k=2",
    "attacks.pgd_steps=1",
    'purifier.layers="auto"',
]
EVAL = [
    "--n-examples",
    "2",
    "--batch-size",
    "2",
    "--samples",
    "2",
    "--steps",
    "1",
    "--eot",
    "1",
    "--repeats",
    "1",
    "--device",
    "cpu",
]
RESNET18 = ['classifier.architecture="torchvision:resnet18"', "classifier.small_stem=true"]
PREACT = "Andriushchenko2020Understanding"  # RobustBench's CIFAR-10 Linf PreActResNet-18
ROBUSTBENCH = [f'classifier.architecture="robustbench:{PREACT}"', 'classifier.robustbench_dataset="cifar10"']


def cfg_of(*sets: str):
    return load_config("smoke", dict(parse_override(s) for s in sets))


def set_args(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def state_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = ckpt.load_tensors(run / train_purifier.CHECKPOINT)
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


# A python: factory, named by the tests as python:test_sources:tiny_resnet (pytest puts tests/ on sys.path).
class TinyBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.shortcut(x) if self.shortcut is not None else x
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + skip)


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int, classes_out: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 1, 1)
        self.stage1 = nn.Sequential(TinyBlock(4, 4, 1), TinyBlock(4, 4, 1))
        self.stage2 = nn.Sequential(TinyBlock(4, 8, 2), TinyBlock(8, 8, 1))
        self.head = nn.Linear(8, classes_out or num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage2(self.stage1(self.stem(x)))
        return self.head(out.mean(dim=(2, 3)))


def tiny_resnet(num_classes: int) -> nn.Module:
    return TinyResNet(num_classes)


def wrong_output() -> nn.Module:
    return TinyResNet(10, classes_out=7)


# --------------------------------------------------------------------------------------------------
# Representation layers
# --------------------------------------------------------------------------------------------------


def test_auto_gives_table7_on_wideresnet_28_10() -> None:
    """'auto' on the paper's WideResNet-28-10 is exactly Table 7's 26 layers, in order (the preset's list)."""
    cfg = load_config("cifar10")
    table7 = list(cfg.purifier.layers)
    assert len(table7) == 26
    cfg.purifier.layers = "auto"
    assert purifier_spec_for(cfg).layers == table7


def test_auto_and_patterns_on_other_architectures() -> None:
    """'auto' on a python: factory: each block's convolutions plus the downsampling shortcut only; globs."""
    cfg = cfg_of('classifier.architecture="python:test_sources:tiny_resnet"')
    model = build_classifier(cfg).eval()
    shape = (3, 32, 32)
    assert auto_layers(model, shape) == [
        "stage1.0.conv1",
        "stage1.0.conv2",
        "stage1.1.conv1",
        "stage1.1.conv2",
        "stage2.0.conv1",
        "stage2.0.conv2",
        "stage2.0.shortcut",
        "stage2.1.conv1",
        "stage2.1.conv2",
    ]
    # a layer not larger than the layerwise encoder's minimum is left out (stage2 is 16×16)
    assert all(n.startswith("stage1") for n in auto_layers(model, shape, min_side=16))
    assert resolve_layers(model, ["stage*.0.conv1", "stage1.0.conv1", "head"]) == [
        "stage1.0.conv1",
        "stage2.0.conv1",
        "head",
    ]
    with pytest.raises(
        CarsoError, match=r"pattern 'stage1\.\*\.conv3' matches no layer.*nearest names:.*stage1\.0\.conv1"
    ):
        resolve_layers(model, ["stage1.*.conv3"])
    cands = {c.name: c.shape for c in candidates(model, shape)}
    assert cands["stage2.0.shortcut"] == (8, 16, 16) and "head" not in cands  # (N, classes) is not image-shaped


def test_representation_too_large_names_size_and_flag() -> None:
    cfg = cfg_of("purifier.max_fc_parameters=1000")
    with pytest.raises(
        CarsoError, match=r"exceeds purifier.max_fc_parameters = 1,000.*--set purifier.max_fc_parameters"
    ):
        purifier_spec_for(cfg)
    cfg = cfg_of(
        'classifier.architecture="python:test_sources:tiny_resnet"', 'purifier.layers=["stage1.0.conv1", "head"]'
    )
    with pytest.raises(CarsoError, match=r"layer 'head' outputs \(10,\) per example, not an image-shaped"):
        purifier_spec_for(cfg)


# --------------------------------------------------------------------------------------------------
# Sources and their errors
# --------------------------------------------------------------------------------------------------


def test_source_errors_are_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CarsoError, match=r"unknown torchvision model 'resnet81' \(nearest: resnet18"):
        build_classifier(cfg_of('classifier.architecture="torchvision:resnet81"'))
    with pytest.raises(CarsoError, match=r"unknown RobustBench model .*nearest: Andriushchenko2020Understanding"):
        build_classifier(
            cfg_of(
                'classifier.architecture="robustbench:Andriushchenko2020Understandin"',
                'classifier.robustbench_dataset="cifar10"',
            )
        )
    with pytest.raises(CarsoError, match=r"nearest: tiny_resnet"):
        build_classifier(cfg_of('classifier.architecture="python:test_sources:tiny_resnett"'))
    with pytest.raises(CarsoError, match=r"gives \(2, 7\) .* not \(2, 10\)"):
        build_classifier(cfg_of('classifier.architecture="python:test_sources:wrong_output"'))
    with pytest.raises(CarsoError, match="must be 'wideresnet' or one of"):
        cfg_of('classifier.architecture="keras:resnet"')
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(
        sources.importlib.util, "find_spec", lambda name, *a: None if name == "timm" else real(name, *a)
    )
    with pytest.raises(CarsoError, match=r'timm:resnet18 needs the timm package: pip install "carso\[timm\]"'):
        build_classifier(cfg_of('classifier.architecture="timm:resnet18"'))
    monkeypatch.undo()
    # weights that do not fit: the first mismatching keys and shapes
    other = tmp_path / "resnet34.pt"
    torch.save(build_classifier(cfg_of('classifier.architecture="torchvision:resnet34"')).state_dict(), other)
    with pytest.raises(
        CarsoError, match=r"torchvision:resnet18 weights in .* do not match the model — unexpected keys: layer1\.2"
    ):
        sources.load(cfg_of(*RESNET18), other)
    with pytest.raises(CarsoError, match=r"torchvision:resnet18 needs weights: --classifier-weights FILE"):
        sources.load(cfg_of(*RESNET18), None)
    # the CLI: one line, exit 1
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            "torchvision:resnet81",
            "--classifier-weights",
            str(other),
            "--out",
            str(tmp_path / "r"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1 and "nearest: resnet18" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_timm_and_python_sources_build_with_preset_normalisation(tmp_path: Path) -> None:
    """timm: and python: get the preset's mean/std inside (said by carso info); weights load from a file."""
    pytest.importorskip("timm", reason="timm is an optional extra (pip install 'carso[timm]')")
    cfg = cfg_of('classifier.architecture="timm:resnet18"', "classifier.small_stem=true", 'purifier.layers="auto"')
    model = build_classifier(cfg).eval()
    file = tmp_path / "timm.safetensors"
    ckpt.save_tensors(file, model.state_dict())
    loaded = sources.load(cfg, file).model
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    # the normalisation is the preset's: the same as normalising by hand and calling without the hook
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    hooks = dict(loaded._forward_pre_hooks)
    loaded._forward_pre_hooks.clear()
    assert torch.allclose(loaded((x - mean) / std), model(x), atol=1e-6)
    loaded._forward_pre_hooks.update(hooks)
    assert "layer1.0.conv1" in purifier_spec_for(cfg, loaded).layers
    result = runner.invoke(
        app,
        [
            "info",
            "--preset",
            "smoke",
            "--no-memory",
            *set_args('classifier.architecture="python:test_sources:tiny_resnet"', 'purifier.layers="auto"'),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "python:test_sources:tiny_resnet" in result.output and "added by carso" in result.output
    assert "stage2.0.shortcut" in result.output and "8×16×16" in result.output
    assert "representation total" in result.output


def _console_script() -> Path:
    """The installed ``carso`` console script (beside this interpreter, else on PATH): what a user runs."""
    beside = Path(sys.executable).parent / "carso"
    if beside.is_file():
        return beside
    found = shutil.which("carso")
    if found is None:
        pytest.skip("no carso console script installed (pip install -e .)")
    return Path(found)


def _run(
    argv: list[str], env: dict[str, str], cwd: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """The command in a subprocess; its completed process, once it succeeded (else its output's tails)."""
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_python_source_is_found_in_the_current_directory(tmp_path: Path) -> None:
    """``carso … python:mymodels:make`` from the folder holding mymodels.py, through the console script (whose
    sys.path[0] is its bin directory, not the current one): found, as ``python -m carso_cli`` finds it."""
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n\n\ndef make(num_classes):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1), "
        "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}  # carso_cli from this checkout, nothing else
    info = ["info", "--preset", "smoke", "--no-memory"]
    sets = set_args('classifier.architecture="python:mymodels:make"', 'purifier.layers=["0", "2"]')
    done = _run([str(_console_script()), *info, *sets], env, cwd=tmp_path, timeout=300)
    assert "python:mymodels:make" in done.stdout and "representation total" in done.stdout


# --------------------------------------------------------------------------------------------------
# End to end: train, evaluate, predict
# --------------------------------------------------------------------------------------------------


def _eval_and_predict(run: Path, source: str, weights_file: bool = True) -> None:
    """The default adaptive eval, ``carso_cli.load`` + a differentiable prediction, and what the run
    records of its classifier (the weights file's sha256; none when the source brought its weights)."""
    result = runner.invoke(app, ["eval", "--run", str(run), *EVAL])  # the default: adaptive
    assert result.exit_code == 0, result.output
    results = json.loads((run / "eval" / "adaptive" / "results.json").read_text())
    assert results, "no results written"
    model = carso_cli.load(run, seed=0)  # rebuilt from the run alone (classifier header, purifier header)
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    scores = model(x)
    assert scores.shape == (2, 10) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    info = json.loads((run / ckpt.CLASSIFIER_REF_FILE).read_text())
    assert info["source"] == source and len(info.get("sha256", "")) == (64 if weights_file else 0)
    header = ckpt.read_metadata(run / ckpt.CLASSIFIER_FILE)
    assert header["weights_sha256"] == info.get("sha256", "") and source in header["classifier"]


@pytest.mark.slow
def test_python_factory_end_to_end(tmp_path: Path) -> None:
    """A python: factory that brings its own weights (no weights file): train one epoch, the default adaptive
    eval, carso_cli.load + predict, carso report naming the source."""
    source = "python:test_sources:tiny_resnet"
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            source,
            "--out",
            str(run),
            "--device",
            "cpu",
            *set_args(*TINY, 'purifier.layers=["stage2.0.shortcut"]'),  # one layer: a small purifier, a quick eval
        ],
    )
    assert result.exit_code == 0, result.output
    _eval_and_predict(run, source, weights_file=False)
    out = tmp_path / "entry.json"
    result = runner.invoke(app, ["report", str(run), "--format", "robustbench", "--output", str(out)])
    assert result.exit_code == 0, result.output
    entry = json.loads(out.read_text())
    assert entry["architecture"] == f"{source} + CARSO purifier" and entry["clean_acc"] != ""
    table = runner.invoke(app, ["report", str(run), "--format", "md"])
    assert table.exit_code == 0 and "C/Cl" in table.output and "adaptive" in table.output, table.output


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tv") / "resnet18-cifar.pt"
    torch.manual_seed(0)
    torch.save(build_classifier(cfg_of(*RESNET18)).state_dict(), path)
    return path


@pytest.mark.slow
def test_torchvision_resnet18_end_to_end_resume_and_two_processes(tmp_path: Path, resnet18_weights: Path) -> None:
    """torchvision resnet18 (32×32 stem) from a weights file: train one epoch, the default adaptive eval,
    carso_cli.load; a finished one-epoch run extended by --resume --epochs 2 equals a two-epoch run, and
    --gpus 2 --device cpu equals the plain run."""
    args = [
        "train-purifier",
        "--preset",
        "smoke",
        "--classifier",
        "torchvision:resnet18",
        "--classifier-weights",
        str(resnet18_weights),
        "--device",
        "cpu",
        *set_args("classifier.small_stem=true", *TINY),
    ]
    plain = tmp_path / "plain"
    result = runner.invoke(app, [*args, "--out", str(plain)])
    assert result.exit_code == 0, result.output
    assert load_run(plain).cfg.classifier.architecture == "torchvision:resnet18"
    _eval_and_predict(plain, "torchvision:resnet18")

    # --resume: a one-epoch run extended to two (the command a user types) = two epochs at once.
    short = [*RESNET18, *TINY, "data.synthetic_train_size=16"]
    stopped = train_purifier.run(cfg_of(*short), resnet18_weights, tmp_path / "stopped", device=CPU).run
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--resume",
            "--out",
            str(stopped),
            "--device",
            "cpu",
            "--epochs",
            "2",
            "--classifier",
            str(resnet18_weights),
        ],
    )
    assert result.exit_code == 0 and "resumed" in result.output, result.output
    whole = train_purifier.run(
        cfg_of(*short, "training.epochs=2"), resnet18_weights, tmp_path / "whole", device=CPU
    ).run
    a, b = state_tensors(whole), state_tensors(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # --gpus 2 --device cpu (torchrun, gloo) = the plain run (float reductions in another order: allclose)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    _run([sys.executable, "-m", "carso_cli", *args, "--gpus", "2", "--out", str(tmp_path / "two")], env)
    a, b = state_tensors(plain), state_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_robustbench_preactresnet18_end_to_end(tmp_path: Path) -> None:
    """RobustBench's PreActResNet-18 through its own loader from its cache layout (written here, no download);
    --resume extends the run without that cache."""
    if importlib.util.find_spec("robustbench") is None:  # not importorskip: sources imports it without its __init__
        pytest.skip("robustbench is an optional extra (pip install 'carso[robustbench]')")
    cache = tmp_path / "models"
    cfg = cfg_of(*ROBUSTBENCH, f'classifier.robustbench_dir="{cache}"')
    torch.manual_seed(0)
    weights = sources.robustbench_file(cfg, PREACT)
    weights.parent.mkdir(parents=True)
    torch.save({"last": build_classifier(cfg).state_dict()}, weights)  # that model's checkpoint layout
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            f"robustbench:{PREACT}",
            "--out",
            str(out),
            "--device",
            "cpu",
            *set_args(*ROBUSTBENCH[1:], f'classifier.robustbench_dir="{cache}"', *TINY),
        ],
    )
    assert result.exit_code == 0, result.output
    _eval_and_predict(out, f"robustbench:{PREACT}")
    assert json.loads((out / ckpt.CLASSIFIER_REF_FILE).read_text())["sha256"] == ckpt.sha256_file(weights)
    extracted = tmp_path / "rep.safetensors"
    result = runner.invoke(
        app, ["extract", "--run", str(out), "--out", str(extracted), "--n-examples", "2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    spec = load_run(out).purifier.spec
    tensors, _ = ckpt.load_tensors(extracted)
    assert all(any(layer in k for k in tensors) for layer in spec.layers)
    weights.unlink()  # the run rebuilds it without RobustBench's cache
    assert carso_cli.load_classifier(out)(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    # --resume extends the finished epoch by one, from the run's own copy (RobustBench's cache is gone)
    resumed = runner.invoke(app, ["train-purifier", "--resume", "--out", str(out), "--epochs", "2", "--device", "cpu"])
    assert resumed.exit_code == 0 and "resumed" in resumed.output, resumed.output
    epochs = [json.loads(line)["epoch"] for line in (out / ckpt.METRICS_FILE).read_text().splitlines()]
    assert epochs == [0, 1]
