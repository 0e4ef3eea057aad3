"""``carso convert``: import the authors' published CARSO weights into a run directory.

The conversion itself (which file is which, the renaming of keys, the strict checks) is
``carso_cli.models.convert``; this module parses the options and prints what was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from carso_cli.commands._common import load_preset
from carso_cli.commands._options import PresetOpt, SetOpt
from carso_cli.models.convert import ConversionKind, run


def cli(
    kind: Annotated[
        ConversionKind, typer.Argument(help="What to convert: 'reference' = the authors' published CARSO files.")
    ],
    preset: PresetOpt,
    classifier: Annotated[Path, typer.Option("--classifier", help="Classifier weights (DeepMind WideResNet layout).")],
    repr_compressors: Annotated[
        Path, typer.Option("--repr-compressors", help="The authors' *_repr_compressors.safetensors.")
    ],
    repr_fcn_compressor: Annotated[
        Path, typer.Option("--repr-fcn-compressor", help="The authors' *_repr_fcn_compressor.safetensors.")
    ],
    decoder: Annotated[Path, typer.Option("--decoder", help="The authors' *_decoder.safetensors.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory to write (default: runs/<preset>-reference-<time>).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a run already in --out.")] = False,
    set_: SetOpt = None,
) -> None:
    """Import the authors' published weights into a run directory (then: carso eval --run DIR)."""
    from rich.table import Table

    from carso_cli import zoo
    from carso_cli.cli import console

    classifier = zoo.resolve_weights(classifier)  # a path, or a published model's name (carso pull --list)
    cfg = load_preset(preset, set_)
    result = run(kind, cfg, classifier, repr_compressors, repr_fcn_compressor, decoder, out, force)
    table = Table(title=escape(f"carso convert {kind.value} — preset '{cfg.name}'"))
    table.add_column("role")
    table.add_column("file")
    for role, path in result.files.items():
        table.add_row(role, escape(str(path)))
    console.print(table)
    p = result.parameters
    console.print(
        f"classifier {p['classifier']:,} parameters; purifier (inference) {p['condition_encoder'] + p['decoder']:,} "
        f"parameters over {result.layers} representation layers"
    )
    console.print(f"[green]wrote[/] {escape(f'{result.run} — evaluate with: carso eval --run {result.run}')}")
