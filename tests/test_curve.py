"""Robustness curves over ε (issue 20): `carso eval --eps-curve`, one resumable evaluation per radius,
the curve's lines and the flag on a rise beyond the noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from carso_cli.cli import app
from carso_cli.errors import CarsoError
from carso_cli.evaluation.curve import curve_lines, curve_rises, parse_radii

runner = CliRunner()


def _results(**columns: tuple[int, int]) -> dict:
    return {
        "metrics": {c.replace("_", "/"): {"correct": k, "total": n, "accuracy": k / n} for c, (k, n) in columns.items()}
    }


def test_radii_are_parsed_sorted_and_bounded() -> None:
    assert parse_radii("8/255, 2/255,4/255,2/255") == [2 / 255, 4 / 255, 8 / 255]
    for bad in ("", "0,8/255", "2"):
        with pytest.raises(CarsoError):
            parse_radii(bad)


def test_lines_start_from_the_clean_accuracy_and_a_rise_beyond_the_noise_is_flagged() -> None:
    points = [
        (2 / 255, _results(C_Cl=(90, 100), C_adaptive=(60, 100), AT_Cl=(80, 100), AT_AA=(50, 100))),
        (4 / 255, _results(C_Cl=(90, 100), C_adaptive=(58, 100), AT_Cl=(80, 100), AT_AA=(30, 100))),
        (8 / 255, _results(C_Cl=(90, 100), C_adaptive=(85, 100), AT_Cl=(80, 100), AT_AA=(31, 100))),
    ]
    lines = curve_lines(points)
    assert set(lines) == {"C/adaptive", "AT/AA"}  # the clean columns are the ε = 0 points, not lines
    assert [p["eps"] for p in lines["C/adaptive"]] == [0.0, 2 / 255, 4 / 255, 8 / 255]
    assert [p["accuracy"] for p in lines["AT/AA"]] == [0.8, 0.5, 0.3, 0.31]
    rises = curve_rises(lines)
    # 58 % → 85 % on 100 examples is far beyond two standard errors (~13 points); 30 % → 31 % is noise
    assert [(r["column"], r["to_eps"]) for r in rises] == [("C/adaptive", 8 / 255)]


def test_one_adaptive_attack_alone_draws_its_own_line() -> None:
    """``--attack NAME --eps-curve``: the line is C/NAME (that attack's worst case), not C/adaptive."""
    points = [
        (e, {**_results(C_Cl=(9, 10), C_adaptive=(k, 10)), "settings": {"attack": "representation"}})
        for e, k in ((2 / 255, 6), (8 / 255, 3))
    ]
    assert list(curve_lines(points)) == ["C/representation"]


def test_eps_curve_evaluates_each_radius_resumably_and_draws_the_curve(tiny_run: Path) -> None:
    args = [
        "eval",
        "--run",
        str(tiny_run),
        "--attack",
        "pgd-eot",
        "--eps-curve",
        "8/255,2/255",
        "--n-examples",
        "4",
        "--batch-size",
        "4",
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
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = tiny_run / "eval" / "pgd-eot-curve"
    curve = json.loads((folder / "curve.json").read_text())
    assert curve["radii"] == [2 / 255, 8 / 255] and curve["preset_eps"] == pytest.approx(8 / 255)
    assert curve["evaluations"] == ["pgd-eot-eps-2_255", "pgd-eot-eps-8_255"]
    for name in curve["evaluations"]:
        settings = json.loads((tiny_run / "eval" / name / "results.json").read_text())["settings"]
        assert settings["eps"] == pytest.approx(2 / 255 if name.endswith("2_255") else 8 / 255)
    assert curve["lines"] and all([p["eps"] for p in pts] == [0.0, 2 / 255, 8 / 255] for pts in curve["lines"].values())
    assert (folder / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "robustness curve" in result.output and "curve: " in result.output
    again = runner.invoke(app, [*args, "--resume"])  # every radius finished: nothing recomputed
    assert again.exit_code == 0, again.output
    assert again.output.count("is complete") == 2
    assert json.loads((folder / "curve.json").read_text())["lines"] == curve["lines"]


def test_eps_curve_refuses_a_single_eps(tiny_run: Path) -> None:
    result = runner.invoke(app, ["eval", "--run", str(tiny_run), "--eps-curve", "2/255", "--eps", "8/255"])
    assert result.exit_code == 1
    assert "--eps-curve sets ε itself" in result.output
