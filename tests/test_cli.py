"""The CLI shell: help, version, info, and one-line errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from carso_cli.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "info" in result.output


def test_info_shows_table_counts() -> None:
    result = runner.invoke(app, ["info", "--preset", "cifar10"])
    assert result.exit_code == 0, result.output
    assert "75,285,504" in result.output  # 147,040 × 512, the representation FC layer (Table 10)
    assert "layer.2.block.0.shortcut" in result.output
    assert "26 layers" in result.output


def test_info_with_override_and_bad_values() -> None:
    ok = runner.invoke(app, ["info", "--preset", "smoke", "--set", "purifier.fcrepr=32"])
    assert ok.exit_code == 0 and "→ 32" in ok.output
    for args, text in [
        (["info", "--preset", "nope"], "unknown preset 'nope'"),
        (["info", "--preset", "smoke", "--set", "purifier.fcrep=32"], "unknown key 'purifier.fcrep'"),
        (["info", "--preset", "smoke", "--set", "purifier.layers=['layer.9.conv']"], "no layer 'layer.9.conv'"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, args
        assert "error:" in result.output and text in result.output
        assert "Traceback" not in result.output


def test_python_dash_m_and_version() -> None:
    out = subprocess.run([sys.executable, "-m", "carso_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("carso ")
