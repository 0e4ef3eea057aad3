"""`carso demo` (the whole pipeline, shrunk) and `carso bench` run end to end through the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from carso_cli import zoo
from carso_cli.cli import app
from carso_cli.commands import demo
from carso_cli.commands._common import load_preset
from carso_cli.commands.demo import DemoSizes
from carso_cli.config import list_presets
from carso_cli.evaluation import adaptive

runner = CliRunner()

# The smoke preset shrunk further so the whole chain takes seconds: the point is the wiring.
TINY = [
    "--set",
    "data.synthetic_train_size=256",
    "--set",
    "data.synthetic_test_size=64",
    "--set",
    "training.epochs=1",
    "--set",
    "training.warmup_epochs=0",
    "--set",
    "training.plateau_epochs=1",
    "--set",
    "training.annealing_epochs=0",
    "--set",
    "training.batch_size=64",
    "--set",
    "classifier_training.epochs=1",
    "--set",
    "classifier_training.batch_size=64",
    "--set",
    "attacks.pgd_steps=1",
    "--set",
    "classifier_training.pgd_steps=1",
    "--set",
    "attacks.randaa_eot_iterations=1",
    "--set",
    "inference.samples=2",
]


def test_demo_sizes_fit_the_five_minute_budget() -> None:
    """The sizes measured for BENCHMARKS.md's demo row; a change must be re-measured (≤ 5 min on 2 cores)."""
    assert DemoSizes() == DemoSizes(
        n_examples=32, batch_size=32, steps=10, eot=2, repeats=2, queries=100, indicator_examples=8
    )
    text = DemoSizes().describe(load_preset("smoke", None))
    assert "32 examples, 10 steps, EoT 2, 2 repeats, Square 100 queries, indicators on 8 examples" in text
    assert "classifier 4 epochs, purifier 6 epochs on 2000 synthetic images" in text


def test_demo_closing_panel_is_three_lines_with_real_next_commands() -> None:
    panel = io.StringIO()
    Console(file=panel, width=80).print(demo.closing_panel())
    lines = panel.getvalue().splitlines()
    assert len(lines) == 5, lines  # three lines between the borders, at 80 columns
    entry = zoo.entries()["cifar10-cui2023"]  # the model it names is in the zoo, with a purifier
    assert entry.has_purifier and entry.preset in list_presets() and "cifar10" in list_presets()


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    """The library function the CLI calls, with even smaller sizes: the printed story is the real one."""
    out = tmp_path / "demo"
    buffer = io.StringIO()
    console = Console(file=buffer, width=300)  # one line per printed sentence
    sizes = DemoSizes(n_examples=4, batch_size=4, steps=1, eot=1, repeats=1, queries=5, indicator_examples=2)
    cfg = load_preset("smoke", [s for s in TINY if s != "--set"])
    demo.run(cfg, out, sizes=sizes, device="cpu", console=console)
    console.print(demo.closing_panel())
    text = buffer.getvalue()
    for name in (
        "config.toml",
        "classifier.safetensors",
        "purifier.safetensors",
        "metrics.jsonl",
        "adversarial-classifier.safetensors",
    ):
        assert (out / name).is_file(), name
    assert "4 examples, 1 steps, EoT 1, 1 repeats, Square 5 queries, indicators on 2 examples" in text
    header = next(line for line in text.splitlines() if "AT/Cl" in line)
    for column in ("AT/Cl", "C/Cl", "AT/AA", "C/randAA", "C/adaptive"):
        assert column in header, column
    assert "attack-failure indicators" in text and "C/adaptive (worst case)" in text
    assert "carso pull cifar10-cui2023" in text and "carso eval --run runs/cifar10-cui2023" in text
    # AutoAttack's own lines go to the log file, summarised in one line.
    log = out / "eval" / "demo" / "autoattack.log"
    assert log.is_file() and "apgd" in log.read_text().lower()
    assert "auto-attack: apgd" not in text and "AutoAttack's log:" in text
    results = json.loads((out / "eval" / "demo" / "results.json").read_text())
    metrics = results["metrics"]
    assert results["settings"]["attack"] == "adaptive" and results["indicators"]["examples"] == 2
    assert metrics["AT/AA"]["accuracy"] <= metrics["AT/Cl"]["accuracy"]
    assert metrics["C/adaptive"]["total"] == 4 and metrics["C/adaptive"]["correct"] <= metrics["C/randAA"]["correct"]


def test_bench_attack_reports_throughput() -> None:
    result = runner.invoke(
        app,
        ["bench", "attack", "--preset", "smoke", "--batch-size", "4", "--batches", "1", "--device", "cpu", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["what"] == "attack" and report["example_gradients_per_s"] > 0
    assert report["randaa_hours_for_10k_upper_bound"] > 0 and report["environment"]["device"] == "cpu"
    # The default evaluation: every attack of --attack adaptive, issue 20's included, dearer than randAA.
    assert set(report["adaptive_passes_per_example"]) == {a for a in adaptive.ATTACKS if a != "square"}
    assert report["adaptive_hours_for_10k_upper_bound"] > report["randaa_hours_for_10k_upper_bound"]
    # CPU: the process's peak RSS, at least what torch itself occupies.
    assert report["peak_memory_kind"] == "cpu_peak_rss" and report["peak_memory_bytes"] > 50 * 2**20


@pytest.mark.slow
def test_bench_train_reports_throughput() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "train",
            "--preset",
            "smoke",
            "--batch-size",
            "16",
            "--batches",
            "1",
            "--device",
            "cpu",
            "--json",
            "--set",
            "attacks.pgd_steps=1",
            "--micro-batch",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["what"] == "train" and report["images_per_s"] > 0 and report["batch_size"] == 16
    assert report["peak_memory_bytes"] > 50 * 2**20
