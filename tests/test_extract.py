"""``carso extract``: the representation file (tensors, metadata) and the per-layer table."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from carso_cli import checkpoint as ckpt
from carso_cli.cli import app
from carso_cli.config import load_config
from carso_cli.data import build_dataset
from carso_cli.extraction import relative_change
from carso_cli.models import build_classifier, load_classifier, sources
from carso_cli.models.representation import forward_with_representation

runner = CliRunner()
LAYERS = ["layer.0.block.0.conv_0", "layer.2.block.0.conv_1"]


def test_extract_attacked_file_and_table(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep.safetensors"
    result = runner.invoke(
        app,
        [
            "extract",
            "--run",
            str(tiny_run),
            "--n-examples",
            "6",
            "--batch-size",
            "4",
            "--attack",
            "fgsm",
            "--eps",
            "8/255",
            "--layers",
            ",".join(reversed(LAYERS)),
            "--out",
            str(out),
            "--dtype",
            "float16",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    for text in (*LAYERS, "6×16×32×32", "6×64×8×8", "mean relative L2 change", "fgsm"):
        assert text in result.output
    tensors, meta = ckpt.load_tensors(out)
    assert json.loads(meta["layers"]) == LAYERS  # execution order, whatever order they were given in
    assert meta["attack"] == "fgsm" and float(meta["eps"]) == 8 / 255 and meta["dtype"] == "float16"
    assert set(tensors) == {
        "inputs",
        "labels",
        "adversarial_inputs",
        *(f"representation/{n}" for n in LAYERS),
        *(f"adversarial_representation/{n}" for n in LAYERS),
    }
    x, y, x_adv = tensors["inputs"], tensors["labels"], tensors["adversarial_inputs"]
    cfg = load_config("smoke")
    ds = build_dataset(cfg, "test")
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(6)]))
    assert y.tolist() == [ds[i][1] for i in range(6)]
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and (x_adv != x).any()
    # The stored representation is the classifier's, at the stored dtype.
    classifier = load_classifier(cfg, tiny_run / ckpt.CLASSIFIER_FILE)
    with torch.no_grad():
        _, rep = forward_with_representation(classifier, LAYERS, x, keep_graph=False)
        _, rep_adv = forward_with_representation(classifier, LAYERS, x_adv, keep_graph=False)
    for name, r, r_adv in zip(LAYERS, rep, rep_adv):
        stored = tensors[f"representation/{name}"]
        assert stored.dtype == torch.float16 and stored.shape == r.shape
        torch.testing.assert_close(stored.float(), r, rtol=1e-2, atol=1e-2)
        change = json.loads(meta["relative_change"])[name]
        assert change > 0
        torch.testing.assert_close(torch.tensor(change), relative_change(r, r_adv).mean(), rtol=1e-4, atol=1e-6)


def test_extract_clean_with_preset_and_classifier(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "clean.safetensors"
    result = runner.invoke(
        app,
        [
            "extract",
            "--preset",
            "smoke",
            "--classifier",
            str(tiny_run / ckpt.CLASSIFIER_FILE),
            "--n-examples",
            "3",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    tensors, meta = ckpt.load_tensors(out)
    layers = json.loads(meta["layers"])
    assert len(layers) == 6 and meta["attack"] == "none"  # the smoke preset's rule: 6 block convolutions
    assert "adversarial_inputs" not in tensors and tensors["representation/" + layers[0]].dtype == torch.float32
    assert "relative L2" not in result.output and layers[-1] in result.output


def test_extract_with_a_classifier_source(tmp_path: Path) -> None:
    """``--preset`` takes the sources as train-purifier does: ``--classifier SOURCE --classifier-weights F``,
    and alone when the source brings its weights (a python: factory, set by ``--set``)."""
    cfg = load_config("smoke", {"classifier.architecture": "torchvision:resnet18", "classifier.small_stem": True})
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(build_classifier(cfg).state_dict(), weights)
    out = tmp_path / "tv.safetensors"
    common = ["--n-examples", "2", "--device", "cpu", "--preset", "smoke"]
    result = runner.invoke(
        app,
        [
            "extract",
            *common,
            "--classifier",
            "torchvision:resnet18",
            "--classifier-weights",
            str(weights),
            "--set",
            "classifier.small_stem=true",
            "--layers",
            "layer1.0.conv1,layer2.0.downsample.0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    tensors, meta = ckpt.load_tensors(out)
    assert "torchvision:resnet18" in meta["source"] and str(weights) in meta["source"]
    with torch.no_grad():  # the representation is the weights file's resnet18, with the preset's normalisation
        _, rep = forward_with_representation(
            sources.load(cfg, weights).model, ["layer1.0.conv1"], tensors["inputs"], keep_graph=False
        )
    torch.testing.assert_close(tensors["representation/layer1.0.conv1"], rep[0])
    assert tensors["representation/layer2.0.downsample.0"].shape == (2, 128, 16, 16)
    # a python: factory needs no weights file: --preset alone
    out = tmp_path / "py.safetensors"
    result = runner.invoke(
        app,
        [
            "extract",
            *common,
            "--set",
            'classifier.architecture="python:test_sources:tiny_resnet"',
            "--set",
            'purifier.layers="auto"',
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    tensors, meta = ckpt.load_tensors(out)
    assert meta["source"] == "python:test_sources:tiny_resnet" and "stage2.0.shortcut" in json.loads(meta["layers"])


def test_extract_errors(tiny_run: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "x.safetensors")
    cases = [
        (["--run", str(tiny_run), "--layers", "layer.0.block.0.conv_O"], "no layer 'layer.0.block.0.conv_O'"),
        (["--run", str(tiny_run), "--layers", "layer.0.block.0.conv_O"], "layer.0.block.0.conv_0,"),  # nearest names
        (["--preset", "smoke"], "wideresnet needs weights: --classifier FILE"),
        (["--preset", "smoke", "--classifier", "torchvision:resnet18"], "needs weights: --classifier-weights FILE"),
        (["--classifier", str(tiny_run / ckpt.CLASSIFIER_FILE)], "--classifier needs --preset"),
        (["--classifier-weights", str(tiny_run / ckpt.CLASSIFIER_FILE)], "--classifier-weights needs --preset"),
        (["--run", str(tiny_run), "--preset", "smoke"], "give either --run or --preset"),
        (["--run", str(tiny_run), "--dtype", "int8"], "--dtype"),
        (["--run", str(tiny_run), "--attack", "pgd", "--eps", "9"], "--eps"),
    ]
    for args, text in cases:
        result = runner.invoke(app, ["extract", *args, "--out", out, "--n-examples", "2", "--device", "cpu"])
        assert result.exit_code == 1, args
        assert text in " ".join(result.output.split()) and "Traceback" not in result.output, (args, result.output)
        assert not Path(out).exists()
    bad = runner.invoke(app, ["extract", "--run", str(tiny_run), "--out", str(tmp_path / "x.pt")])
    assert bad.exit_code == 1 and ".safetensors" in bad.output


def test_relative_change() -> None:
    clean = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]])
    adv = torch.tensor([[3.0, 4.0 + 0.5], [0.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(relative_change(clean, adv), torch.tensor([0.1, 0.0, float("inf")]))
