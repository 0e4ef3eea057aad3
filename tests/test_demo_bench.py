"""`carso demo` (the whole pipeline, shrunk) and `carso bench` run end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carso_cli.cli import app

runner = CliRunner()

# The smoke preset shrunk further so the whole chain takes seconds: the point is the wiring.
TINY = [
    "--set", "data.synthetic_train_size=256", "--set", "data.synthetic_test_size=64",
    "--set", "training.epochs=1", "--set", "training.warmup_epochs=0", "--set", "training.plateau_epochs=1",
    "--set", "training.annealing_epochs=0", "--set", "training.batch_size=64",
    "--set", "classifier_training.epochs=1", "--set", "classifier_training.batch_size=64",
    "--set", "attacks.pgd_steps=1", "--set", "classifier_training.pgd_steps=1",
    "--set", "attacks.randaa_eot_iterations=1", "--set", "inference.samples=2",
]


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--n-examples", "8", "--device", "cpu", *TINY])
    assert result.exit_code == 0, result.output
    for name in ("config.toml", "classifier.safetensors", "purifier.safetensors", "metrics.jsonl",
                 "adversarial-classifier.safetensors"):
        assert (out / name).is_file(), name
    assert "AT/Cl" in result.output and "C/randAA" in result.output and "run directory" in result.output
    results = json.loads(next((out / "eval").rglob("results.json")).read_text())
    metrics = results["metrics"]
    assert metrics["AT/AA"]["accuracy"] <= metrics["AT/Cl"]["accuracy"]
    assert metrics["C/randAA"]["total"] == 8


def test_bench_attack_reports_throughput() -> None:
    result = runner.invoke(app, ["bench", "attack", "--preset", "smoke", "--batch-size", "4", "--batches", "1",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["what"] == "attack" and report["example_gradients_per_s"] > 0
    assert report["randaa_hours_for_10k_upper_bound"] > 0 and report["environment"]["device"] == "cpu"
    # CPU: the process's peak RSS, at least what torch itself occupies.
    assert report["peak_memory_kind"] == "cpu_peak_rss" and report["peak_memory_bytes"] > 50 * 2**20


@pytest.mark.slow
def test_bench_train_reports_throughput() -> None:
    result = runner.invoke(app, ["bench", "train", "--preset", "smoke", "--batch-size", "16", "--batches", "1",
                                 "--device", "cpu", "--json", "--set", "attacks.pgd_steps=1", "--micro-batch", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["what"] == "train" and report["images_per_s"] > 0 and report["batch_size"] == 16
    assert report["peak_memory_bytes"] > 50 * 2**20
