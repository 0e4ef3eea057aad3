"""``carso report``: the Table 2 columns of several runs in one table, for a paper or a leaderboard.

Reading the runs' results and writing Markdown, LaTeX, CSV and RobustBench JSON is
``carso_cli.reporting``; this module parses the options and prints or writes the text.
"""

from __future__ import annotations

import io
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from carso_cli.reporting import read_run, robustbench_json, table_cells, to_csv, to_latex, to_markdown


class Format(str, Enum):
    table = "table"
    md = "md"
    tex = "tex"
    csv = "csv"
    robustbench = "robustbench"


def cli(
    runs: Annotated[
        list[Path], typer.Argument(help="Run directories (or eval folders / results.json files).", show_default=False)
    ],
    fmt: Annotated[
        Format, typer.Option("--format", help="table (rich), md, tex, csv or robustbench (model_info JSON).")
    ] = Format.table,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Table 2's columns (and adaptive ones when present) across runs: Markdown, LaTeX, CSV or RobustBench."""
    from rich.markup import escape
    from rich.table import Table

    from carso_cli import checkpoint as ckpt
    from carso_cli.cli import console, err_console

    rows = [row for p in runs for row in read_run(p)]
    if fmt is Format.table:
        header, body = table_cells(rows)
        t = Table(title="carso report — accuracy (%) (Table 2: AT = classifier alone, C = CARSO)")
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i == 0 else "right")
        for r in body:
            t.add_row(*[escape(c) for c in r])
        if output is None:
            console.print(t)
            return
        text = _plain_text(t)
    elif fmt is Format.md:
        text = to_markdown(rows)
    elif fmt is Format.tex:
        text = to_latex(rows)
    elif fmt is Format.csv:
        text = to_csv(rows)
    else:
        text, missing = robustbench_json(rows)
        for run, fields in missing.items():
            err_console.print(
                f"[yellow]note:[/] {escape(run)}: fill in {', '.join(fields)} (carso cannot know them)",
                highlight=False,
                soft_wrap=True,
            )
    if output is None:
        typer.echo(text, nl=False)
    else:
        ckpt.atomic_write_text(output, text)
        err_console.print(f"[green]wrote[/] {escape(str(output))}", highlight=False)


def _plain_text(table: Any) -> str:
    from rich.console import Console

    c = Console(record=True, width=160, file=io.StringIO())
    c.print(table)
    return c.export_text()
