"""``carso pull``: a published model by name → a ready run directory (or a cached classifier).

The files come from the zoo (``carso_cli/zoo.toml``) into the cache and the run is written by
``zoo.pull`` (what ``carso_cli.load("NAME")`` calls too); this module parses the options and shows the
zoo (``--list``, ``--info``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from carso_cli import zoo
from carso_cli.errors import CarsoError


def _contents(entry: zoo.ZooEntry) -> str:
    return "run" if entry.has_purifier else "classifier"


def _headline(entry: zoo.ZooEntry) -> str:
    """The paper's robust figure of what the entry gives: CARSO's C/randAA for a run, else AT/AA."""
    for key in ("C/randAA", "AT/AA") if entry.has_purifier else ("AT/AA",):
        if key in entry.reported:
            return f"{key} {entry.reported[key]:.4f}"
    return next((f"{k} {v:.4f}" for k, v in entry.reported.items()), "")  # whatever the paper gives


def zoo_table() -> Any:
    """The zoo as a compact rich table (``carso pull --list``): the names whole, first, on one line each.

    The names are what a user copies, so their column never wraps or shrinks; the rest fits 80 columns
    and the long text (title, every figure, notes) is under ``--list --long`` and ``--info NAME``.
    """
    from rich import box
    from rich.table import Table

    models = zoo.entries()
    widest = max((len(n) for n in models), default=4)
    table = Table(
        title="Published models",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        caption="carso pull NAME downloads one; carso pull --info NAME (or --list --long) tells more",
        caption_justify="left",
    )
    table.add_column("name", no_wrap=True, min_width=widest, style="bold")
    table.add_column("preset", no_wrap=True)
    table.add_column("gives", no_wrap=True)
    table.add_column("paper", overflow="fold")
    for entry in models.values():
        table.add_row(*(escape(cell) for cell in (entry.name, entry.preset, _contents(entry), _headline(entry))))
    return table


def entry_details(entry: zoo.ZooEntry) -> Any:
    """One entry in full, as indented paragraphs that wrap at any width (``--info``, ``--list --long``)."""
    from rich.console import Group
    from rich.padding import Padding
    from rich.text import Text

    contents = (
        "classifier + purifier → a ready run" if entry.has_purifier else "classifier only (train a purifier on it)"
    )
    figures = ", ".join(f"{k} {v:.4f}" for k, v in entry.reported.items())
    lines = [f"preset {entry.preset}; {contents}"]
    if entry.title:
        lines.insert(0, entry.title)
    if figures:
        lines.append(f"paper, {entry.reported_in}: {figures}" if entry.reported_in else f"paper: {figures}")
    if entry.notes:
        lines.append(f"notes: {entry.notes}")
    body = [Padding(Text(line), (0, 0, 0, 2)) for line in lines]
    return Group(Text(entry.name, style="bold"), *body)


def zoo_long() -> Any:
    """Every entry in full (``carso pull --list --long``)."""
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = [Text(f"Published models ({zoo.base_url()})", style="bold")]
    for entry in zoo.entries().values():
        parts += [Text(""), entry_details(entry)]
    return Group(*parts)


def cli(
    name: Annotated[str | None, typer.Argument(help="Model name (see --list), e.g. cifar10-cui2023.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="Show the published models and exit.")] = False,
    long: Annotated[bool, typer.Option("--long", help="With --list: every model's title, figures and notes.")] = False,
    info: Annotated[
        str | None,
        typer.Option("--info", metavar="NAME", help="Show one model's title, figures, notes and files, and exit."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory to write (default: runs/NAME).")] = None,
    cache: Annotated[
        Path | None, typer.Option("--cache", help=f"Download cache (default: ${zoo.CACHE_ENV}, else ~/.cache/carso).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a run already in --out.")] = False,
) -> None:
    """Download a published model (resumable, sha256 recorded) into a ready run: then carso eval --run DIR."""
    from carso_cli.cli import console, err_console

    if info is not None:
        entry = zoo.get(info)
        console.print(entry_details(entry))
        for role, rel in entry.files.items():  # soft-wrapped: a URL stays one copyable line
            console.print(f"  {role}: {zoo.url_of(rel)}", soft_wrap=True, highlight=False)
        return
    if list_:
        console.print(zoo_long() if long else zoo_table())
        return
    if long:
        raise CarsoError("--long goes with --list (carso pull --list --long)")
    if name is None:
        raise CarsoError("give a model name, e.g. carso pull cifar10-cui2023 (carso pull --list shows them all)")
    result = zoo.pull(name, out, cache, force, console=err_console)
    for f in result.files.values():
        console.print(f"{f.role}: {f.path} (sha256 {f.sha256})", soft_wrap=True, highlight=False, markup=False)
    if result.run is None:
        if out is not None:
            err_console.print(
                f"[yellow]note:[/] --out is not used: {escape(name)} has no published purifier to convert"
            )
        console.print(
            f"[green]{escape(name)}[/] "
            + escape(
                f"is a classifier only; train a purifier on it with: carso "
                f"train-purifier --preset {result.entry.preset} --classifier {name}"
            ),
            soft_wrap=True,
            highlight=False,
        )
        return
    done = "already pulled" if result.up_to_date else "wrote"
    console.print(
        f"[green]{done}[/] " + escape(f"{result.run} — evaluate with: carso eval --run {result.run}"),
        soft_wrap=True,
        highlight=False,
    )
