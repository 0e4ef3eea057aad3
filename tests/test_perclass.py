"""Per-class accuracy of an evaluation: the pure table, results.json through ``carso eval``, ``carso plot``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_random_run
from PIL import Image
from test_classnames import FOLDERS, imagefolder_cfg, make_imagefolder
from typer.testing import CliRunner

from carso_cli.cli import app
from carso_cli.errors import CarsoError
from carso_cli.evaluation.perclass import labels_of, per_class
from carso_cli.plotting import read_per_class

runner = CliRunner()


def test_per_class_counts_each_column_within_each_class() -> None:
    labels = [0, 1, 1, 2, 2, 2]
    flags = {
        "classifier_clean": [1, 0, 1, 1, 1, 0],
        "carso_clean": [1, 1, 1, 0, 1, 1],
        "carso_adaptive": [0, 0, 1, 0, 1, 1],
        "adaptive_apgd": [1, -1, 0, 1, 1, 1],  # not a Table 2 column: left out
    }
    table = per_class(flags, labels, ["cat", "dog", "frog"])
    assert table["columns"] == ["AT/Cl", "C/Cl", "C/adaptive"]
    rows = {r["name"]: r for r in table["classes"]}
    assert [r["class"] for r in table["classes"]] == [0, 1, 2]
    assert rows["cat"]["total"] == 1 and rows["cat"]["correct"] == {"AT/Cl": 1, "C/Cl": 1, "C/adaptive": 0}
    assert rows["dog"]["accuracy"] == {"AT/Cl": 0.5, "C/Cl": 1.0, "C/adaptive": 0.5}
    assert rows["frog"]["accuracy"]["AT/Cl"] == pytest.approx(2 / 3) and rows["frog"]["correct"]["C/Cl"] == 2
    assert per_class(flags, [5, 5, 5, 5, 5, 5], None)["classes"][0]["name"] == "class 5"  # no names: numbers


def test_labels_come_in_example_order_and_only_when_every_batch_kept_them() -> None:
    records = [{"start": 2, "labels": [3, 4]}, {"start": 0, "labels": [1, 2]}]
    assert labels_of(records) == [1, 2, 3, 4]
    assert labels_of([*records, {"start": 4}]) is None


def test_eval_writes_per_class_accuracy_with_the_folder_names_and_plot_draws_it(tmp_path: Path) -> None:
    data = make_imagefolder(tmp_path / "pets")
    run = make_random_run(tmp_path / "run", imagefolder_cfg(data, {"inference.samples": 2}))
    result = runner.invoke(
        app, ["eval", "--run", str(run), "--attack", "none", "--batch-size", "3", "--device", "cpu", "--name", "clean"]
    )
    assert result.exit_code == 0, result.output
    results = json.loads((run / "eval" / "clean" / "results.json").read_text())
    table = results["per_class"]
    assert [r["name"] for r in table["classes"]] == list(FOLDERS) and table["columns"] == ["AT/Cl", "C/Cl"]
    assert [r["total"] for r in table["classes"]] == [4, 4]  # val/cat and val/dog hold 4 images each
    for column in table["columns"]:  # the classes add up to the overall column
        assert sum(r["correct"][column] for r in table["classes"]) == results["metrics"][column]["correct"]

    plotted = runner.invoke(app, ["plot", str(run / "eval" / "clean")])
    assert plotted.exit_code == 0, plotted.output
    png = run / "eval" / "clean" / "per_class.png"
    assert str(png) in " ".join(plotted.output.split())
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] >= 600


def test_plot_of_results_without_per_class_says_why(tmp_path: Path) -> None:
    results = tmp_path / "eval" / "old" / "results.json"
    results.parent.mkdir(parents=True)
    results.write_text(json.dumps({"metrics": {}, "per_class": None}))
    with pytest.raises(CarsoError, match="no per-class accuracy"):
        read_per_class(results)
    result = runner.invoke(app, ["plot", str(results.parent)])
    assert result.exit_code == 1 and "run the evaluation again" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("classes", [3, 60])
def test_plot_per_class_bars_and_heat_map(tmp_path: Path, classes: int) -> None:
    from carso_cli.plotting import plot_per_class

    labels = [k % classes for k in range(2 * classes)]
    flags = {"classifier_clean": [k % 2 for k in range(2 * classes)], "carso_clean": [1] * (2 * classes)}
    out = plot_per_class(per_class(flags, labels, None), tmp_path / "p.png", title="t")
    with Image.open(out) as img:
        assert img.format == "PNG"


def test_per_class_survives_resume_and_does_not_depend_on_batch_size(tiny_run: Path) -> None:
    def evaluate(name: str, batch: str, *extra: str) -> dict:
        args = [
            "eval",
            "--run",
            str(tiny_run),
            "--attack",
            "none",
            "--n-examples",
            "10",
            "--samples",
            "2",
            "--batch-size",
            batch,
            "--device",
            "cpu",
            "--name",
            name,
            *extra,
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads((tiny_run / "eval" / name / "results.json").read_text())

    first = evaluate("a", "4")
    assert sum(r["total"] for r in first["per_class"]["classes"]) == 10
    assert all(r["name"] == str(r["class"]) for r in first["per_class"]["classes"])  # synthetic: the numbers
    assert evaluate("b", "10")["per_class"] == first["per_class"]
    (tiny_run / "eval" / "a" / "batch-00001.json").unlink()
    assert evaluate("a", "4", "--resume")["per_class"] == first["per_class"]
