"""``carso report``: Table 2 across runs as a rich table, Markdown, LaTeX, CSV and RobustBench JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from carso_cli.cli import app

runner = CliRunner()


def _metric(correct: int, total: int = 200) -> dict:
    return {"correct": correct, "total": total, "accuracy": correct / total}


def _fake_run(
    root: Path, name: str, metrics: dict, adaptive: object = None, n: int = 200, architecture: str = ""
) -> Path:
    """A run directory as carso eval leaves it (config.toml and eval/*/results.json), numbers made up."""
    run = root / name
    (run / "eval" / "autoattack").mkdir(parents=True)
    source = f'architecture = "{architecture}"\n' if architecture else ""  # older runs have none: the WideResNet
    (run / "config.toml").write_text(f'[data]\ndataset = "cifar10"\n[classifier]\n{source}depth = 28\nwidth = 10\n')
    results = {"format": "carso-eval/1", "n_examples": n, "settings": {"eps": 8 / 255}, "metrics": metrics}
    if adaptive is not None:
        results["adaptive"] = adaptive
    (run / "eval" / "autoattack" / "results.json").write_text(json.dumps(results))
    return run


def _runs(tmp_path: Path) -> list[Path]:
    a = _fake_run(
        tmp_path,
        "wrn_28%a",
        {"AT/Cl": _metric(180), "C/Cl": _metric(175), "AT/AA": _metric(120), "C/randAA": _metric(150)},
    )
    b = _fake_run(
        tmp_path,
        "run_b",
        {"AT/Cl": _metric(170), "C/Cl": _metric(169), "AT/AA": _metric(110), "C/randAA": _metric(140)},
        adaptive={"metrics": {"worst": _metric(101)}, "attacks": ["apgd-ce"], "weird": 3},
    )
    return [a, b]


def test_tex_is_a_well_formed_tabular(tmp_path: Path) -> None:
    a, b = _runs(tmp_path)
    out = tmp_path / "t.tex"
    result = runner.invoke(app, ["report", str(a), str(b), "--format", "tex", "--output", str(out)])
    assert result.exit_code == 0, result.output
    tex = out.read_text()
    lines = [ln for ln in tex.splitlines() if ln and not ln.startswith("%")]
    assert lines[0].startswith(r"\begin{tabular}{") and lines[-1] == r"\end{tabular}"
    assert tex.count(r"\begin{") == tex.count(r"\end{") == 1
    spec = re.match(r"\\begin\{tabular\}\{([lcr]+)\}", lines[0]).group(1)
    rows = [ln for ln in lines[1:-1] if ln != r"\hline"]
    assert len(rows) == 3  # header + two runs
    for row in rows:
        assert row.endswith(r" \\")
        cells = re.split(r"(?<!\\)&", row[:-3])
        assert len(cells) == len(spec), row  # every row has exactly one cell per column
    assert r"wrn\_28\%a" in tex and "wrn_28" not in tex.replace(r"\_", "")  # escaped _ and %
    header = rows[0]
    assert "AT/Cl" in header and "C/randAA" in header and "adaptive/worst" in header
    assert "87.50" in rows[1] and "75.00" in rows[1]  # 175/200 clean, 150/200 randAA
    assert re.split(r"(?<!\\)&", rows[1][:-3])[-1].strip() == ""  # run a has no adaptive result: empty cell
    assert re.split(r"(?<!\\)&", rows[2][:-3])[-1].strip() == "50.50"


def test_markdown_csv_and_table(tmp_path: Path) -> None:
    a, b = _runs(tmp_path)
    md = runner.invoke(app, ["report", str(a), str(b), "--format", "md"]).output.splitlines()
    assert md[0].startswith("| run | ε | n | AT/Cl | C/Cl | AT/AA | C/randAA | adaptive/worst |")
    assert all(line.count("|") == md[0].count("|") for line in md)
    csv = runner.invoke(app, ["report", str(a), "--format", "csv"]).output.splitlines()
    assert csv == ["run,eps,n,AT/Cl,C/Cl,AT/AA,C/randAA", "wrn_28%a,8/255,200,90.00,87.50,60.00,75.00"]
    table = runner.invoke(app, ["report", str(a), str(b)])
    assert table.exit_code == 0 and "C/randAA" in table.output and "run_b" in table.output


def test_robustbench_entry_names_the_fields_left_to_fill(tmp_path: Path) -> None:
    a, _ = _runs(tmp_path)
    out = tmp_path / "entry.json"
    result = runner.invoke(app, ["report", str(a), "--format", "robustbench", "--output", str(out)])
    assert result.exit_code == 0, result.output
    entry = json.loads(out.read_text())
    assert list(entry) == [
        "name",
        "link",
        "authors",
        "additional_data",
        "number_forward_passes",
        "dataset",
        "venue",
        "architecture",
        "eps",
        "clean_acc",
        "reported",
        "autoattack_acc",
        "unreliable",
        "footnote",
    ]
    assert entry["clean_acc"] == "87.50" and entry["autoattack_acc"] == "75.00" and entry["eps"] == "8/255"
    assert entry["dataset"] == "cifar10" and entry["architecture"].startswith("WideResNet-28-10")
    assert entry["name"] == "" and entry["venue"] == ""
    assert (
        "fill in name, link, authors, additional_data, number_forward_passes, venue, reported, unreliable"
        in " ".join(result.output.split())
    )


def test_robustbench_architecture_names_the_classifier_source(tmp_path: Path) -> None:
    """Another source than the WideResNet is named as such (its config still holds the unused depth/width)."""
    metrics = {"C/Cl": _metric(175), "C/randAA": _metric(150)}
    runs = {
        "torchvision:resnet18": _fake_run(tmp_path, "tv", metrics, architecture="torchvision:resnet18"),
        "python:mymodels:make": _fake_run(tmp_path, "py", metrics, architecture="python:mymodels:make"),
        "wideresnet": _fake_run(tmp_path, "wrn", metrics, architecture="wideresnet"),
    }
    out = tmp_path / "entries.json"
    result = runner.invoke(app, ["report", *map(str, runs.values()), "--format", "robustbench", "--output", str(out)])
    assert result.exit_code == 0, result.output
    entries = json.loads(out.read_text())
    assert entries["tv"]["architecture"] == "torchvision:resnet18 + CARSO purifier"
    assert entries["py"]["architecture"] == "python:mymodels:make + CARSO purifier"
    assert entries["wrn"]["architecture"] == "WideResNet-28-10 + CARSO purifier"


def test_each_eps_is_its_own_row_and_one_attack_alone_its_own_column(tmp_path: Path) -> None:
    """An evaluation at another ε (``--eps``, ``--eps-curve``) is a row of its own, not cells mixed into the
    preset's row under its ε; ``--attack NAME`` (one adaptive attack) fills C/NAME, not C/adaptive."""
    run = _fake_run(tmp_path, "r", {"C/Cl": _metric(170), "C/randAA": _metric(150), "C/adaptive": _metric(120)})
    for name, eps, attack, metrics in (
        ("small", 2 / 255, "adaptive", {"C/Cl": _metric(170), "C/randAA": _metric(165)}),
        ("alone", 8 / 255, "representation", {"C/Cl": _metric(170), "C/adaptive": _metric(160)}),
    ):
        (run / "eval" / name).mkdir()
        results = {"n_examples": 200, "settings": {"eps": eps, "attack": attack}, "metrics": metrics}
        (run / "eval" / name / "results.json").write_text(json.dumps(results))
    csv = runner.invoke(app, ["report", str(run), "--format", "csv"]).output.splitlines()
    assert csv == [
        "run,eps,n,C/Cl,C/randAA,C/adaptive,C/representation",
        "r,2/255,200,85.00,82.50,,",
        "r,8/255,200,85.00,75.00,60.00,80.00",
    ]
    entries = json.loads(runner.invoke(app, ["report", str(run), "--format", "robustbench"]).stdout)
    assert set(entries) == {"r (ε = 2/255)", "r (ε = 8/255)"}
    assert entries["r (ε = 8/255)"]["autoattack_acc"] == "75.00"


def test_run_without_results_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no results" in result.output and "Traceback" not in result.output
    bad = _fake_run(tmp_path, "bad", {})
    (bad / "eval" / "autoattack" / "results.json").write_text("{not json")
    result = runner.invoke(app, ["report", str(bad)])
    assert result.exit_code == 1 and "unreadable" in result.output
