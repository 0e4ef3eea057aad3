"""``carso pull``: a published model by name → a ready run directory (or a cached classifier).

The files come from the zoo (``carso_cli/zoo.toml``) into the cache (``zoo.fetch``: resumable,
checksummed); the purifier parts are then converted by exactly the code of ``carso convert
reference`` into ``runs/NAME`` (``--out``), with ``zoo.json`` recording each file's URL and sha256.
The run is written under its lock, and a failed conversion removes what it made. An entry without a
published purifier (Table 18's classifiers) is only downloaded: its path goes to ``--classifier``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from carso_cli import checkpoint as ckpt
from carso_cli import locking, zoo
from carso_cli.commands import convert
from carso_cli.config import load_config
from carso_cli.errors import CarsoError

RECORD_FILE = "zoo.json"


@dataclass
class PullResult:
    entry: zoo.ZooEntry
    files: dict[str, zoo.Fetched]
    run: Path | None  # None: a classifier-only entry
    up_to_date: bool = False


def record_of(entry: zoo.ZooEntry, files: dict[str, zoo.Fetched]) -> dict[str, Any]:
    """What ``zoo.json`` holds: the entry's name and preset, and each file's URL, size and sha256."""
    return {
        "name": entry.name,
        "preset": entry.preset,
        "files": {role: {"url": f.url, "bytes": f.bytes, "sha256": f.sha256} for role, f in files.items()},
    }


def _already_pulled(run: Path, record: dict[str, Any]) -> bool:
    try:
        return json.loads((run / RECORD_FILE).read_text()) == record and ckpt.is_run_dir(run)
    except (OSError, ValueError):
        return False


def run(name: str, out: Path | None = None, cache: Path | None = None, force: bool = False,
        console: Any = None) -> PullResult:
    """Download ``name``'s files and, for an entry with a purifier, write the run ``out`` (default runs/NAME)."""
    entry = zoo.get(name)
    files = zoo.fetch(entry, cache, console)
    if not entry.has_purifier:
        return PullResult(entry, files, None)
    run_dir = Path(out) if out is not None else ckpt.RUNS_ROOT / entry.name
    record = record_of(entry, files)
    if not force and _already_pulled(run_dir, record):
        return PullResult(entry, files, run_dir, up_to_date=True)
    cfg = load_config(entry.preset)
    made = not run_dir.exists()
    with locking.hold(run_dir), ckpt.undo_on_failure(run_dir, made, keep=[]):
        convert.run(convert.ConversionKind.reference, cfg, *(files[role].path for role in zoo.ROLES),
                    out=run_dir, force=force)
        ckpt.atomic_write_json(run_dir / RECORD_FILE, record)
    return PullResult(entry, files, run_dir)


def zoo_table() -> Any:
    """The zoo as a rich table (``carso pull --list``)."""
    from rich.table import Table

    table = Table(title=escape(f"Published models ({zoo.base_url()})"), show_lines=True)
    for column in ("name", "preset", "contents", "paper", "notes"):
        table.add_column(column, overflow="fold")
    for entry in zoo.entries().values():
        contents = "classifier + purifier → run" if entry.has_purifier else "classifier only"
        figures = ", ".join(f"{k} {v:.4f}" for k, v in entry.reported.items())
        table.add_row(*(escape(cell) for cell in (entry.name, entry.preset, contents, f"{entry.reported_in}: {figures}", entry.notes)))
    return table


def cli(
    name: Annotated[Optional[str], typer.Argument(help="Model name (see --list), e.g. cifar10-cui2023.")] = None,
    list_: Annotated[bool, typer.Option("--list", help="Show the published models and exit.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run directory to write (default: runs/NAME).")] = None,
    cache: Annotated[
        Optional[Path], typer.Option("--cache", help=f"Download cache (default: ${zoo.CACHE_ENV}, else ~/.cache/carso).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a run already in --out.")] = False,
) -> None:
    """Download a published model (resumable, sha256 recorded) into a ready run: then carso eval --run DIR."""
    from carso_cli.cli import console, err_console

    if list_:
        console.print(zoo_table())
        return
    if name is None:
        raise CarsoError("give a model name, e.g. carso pull cifar10-cui2023 (carso pull --list shows them all)")
    result = run(name, out, cache, force, console=err_console)
    for f in result.files.values():
        console.print(f"{f.role}: {f.path} (sha256 {f.sha256})", soft_wrap=True, highlight=False, markup=False)
    if result.run is None:
        if out is not None:
            err_console.print(f"[yellow]note:[/] --out is not used: {escape(name)} has no published purifier to convert")
        console.print(f"[green]{escape(name)}[/] " + escape(f"is a classifier only; train a purifier on it with: carso "
                      f"train-purifier --preset {result.entry.preset} --classifier {name}"), soft_wrap=True, highlight=False)
        return
    done = "already pulled" if result.up_to_date else "wrote"
    console.print(f"[green]{done}[/] " + escape(f"{result.run} — evaluate with: carso eval --run {result.run}"),
                  soft_wrap=True, highlight=False)
