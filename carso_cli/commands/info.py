"""``carso info``: a preset's modules, representation layers, sizes and parameter counts (a dry run);
``--json``: the resolved preset and what it implies (``derived``); ``--diff B``: how two recipes differ.

What is shown is computed by ``carso_cli.recipes``; this module parses the options and draws the tables.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from carso_cli.commands._common import load_preset
from carso_cli.commands._options import PresetOpt, SetOpt
from carso_cli.config import Config, config_to_dict
from carso_cli.models import sources
from carso_cli.recipes import ModuleSize, candidate_layers, derived, diff, memory_estimate, module_sizes

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the resolved preset and a 'derived' block as JSON.")]
DiffOpt = Annotated[
    str | None, typer.Option("--diff", metavar="PRESET", help="List the resolved keys that differ from this preset's.")
]
InfoGpusOpt = Annotated[
    int,
    typer.Option(
        "--gpus",
        min=1,
        help="Processes (the per-process batch of derived.adversarial_per_attack and the memory estimate).",
    ),
]
GpuMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--gpu-memory",
        help=(
            "A GPU's memory, e.g. 80GB or 80GiB: print the largest --attack-chunk / --micro-batch / eval batch "
            "that fit it."
        ),
    ),
]
MemoryOpt = Annotated[
    bool,
    typer.Option(
        "--memory/--no-memory",
        help="Estimate peak GPU memory (measures activations on the CPU: a few seconds at full size).",
    ),
]


def cli(
    preset: PresetOpt = "cifar10",
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    diff_with: DiffOpt = None,
    gpus: InfoGpusOpt = 1,
    gpu_memory: GpuMemoryOpt = None,
    show_memory: MemoryOpt = True,
) -> None:
    """Show a preset's modules, representation layers and parameter counts (nothing is trained)."""
    from carso_cli.cli import console

    cfg = load_preset(preset, set_)
    if diff_with is not None:
        other = load_preset(diff_with)
        rows = diff(cfg, other)
        if as_json:
            typer.echo(json.dumps({k: [va, vb] for k, va, vb in rows}, indent=2))
            return
        console.print(diff_table(cfg, other, rows))
        return
    if as_json:
        typer.echo(json.dumps({**config_to_dict(cfg), "derived": derived(cfg, gpus)}, indent=2))
        return
    rows, layers = module_sizes(cfg)
    console.print(module_table(cfg, rows))
    console.print(sources.describe(cfg), soft_wrap=True, highlight=False, markup=False)
    console.print(layer_table(cfg, layers))
    total = sum(c * h * w for _, (c, h, w) in layers)
    spec = cfg.purifier.layers if isinstance(cfg.purifier.layers, str) else "a list"
    console.print(
        f"representation: {len(layers)} layers (purifier.layers = {spec}), representation total {total:,} "
        f"values per image ({total * 4 / 2**20:.2f} MiB in float32)",
        soft_wrap=True,
        highlight=False,
    )
    if show_memory or gpu_memory is not None:
        console.print(memory_table(cfg, gpus, gpu_memory))


def diff_table(cfg: Config, other: Config, rows: list[tuple[str, Any, Any]]) -> Table:
    table = Table(title=f"{len(rows)} resolved keys differ")
    table.add_column("key")
    table.add_column(escape(cfg.name))
    table.add_column(escape(other.name))
    for k, va, vb in rows:
        table.add_row(k, escape(json.dumps(va)), escape(json.dumps(vb)))
    return table


def module_table(cfg: Config, rows: list[ModuleSize]) -> Table:
    """The modules with their shapes and parameter counts, and the purifier's totals."""
    table = Table(title=escape(f"carso info — preset '{cfg.name}' ({cfg.description})"))
    table.add_column("module")
    table.add_column("shape")
    table.add_column("parameters", justify="right")
    table.add_column("inference", justify="center")
    for r in rows:
        table.add_row(escape(r.name), r.shape, f"{r.parameters:,}", "✓" if r.used_at_inference else "training only")
    purifier_total = sum(r.parameters for r in rows[1:])
    inference_total = sum(r.parameters for r in rows[1:] if r.used_at_inference)
    table.add_section()
    table.add_row("purifier total", "", f"{purifier_total:,}", "")
    table.add_row("purifier at inference", "", f"{inference_total:,}", "")
    return table


def layer_table(cfg: Config, layers: list[tuple[str, tuple[int, ...]]]) -> Table:
    """Every candidate layer (image-shaped output) with its shape; the chosen ones numbered in execution order."""
    table = Table(
        title="candidate layers (image-shaped outputs); #: the representation's, in execution order; "
        f"too small: side ≤ {2 * cfg.purifier.layerwise_depth} (the layerwise encoder's minimum)"
    )
    table.add_column("#", justify="right")
    table.add_column("layer")
    table.add_column("C×H×W")
    for c in candidate_layers(cfg, layers):
        note = " (too small)" if c.too_small else ""
        table.add_row("" if c.index is None else str(c.index), escape(c.name), "×".join(map(str, c.shape)) + note)
    return table


def memory_table(cfg: Config, gpus: int = 1, gpu_memory: str | None = None) -> Table:
    """Estimated peak GPU memory (``recipes.memory_estimate``) as a table."""
    from carso_cli.memory import format_bytes

    estimate = memory_estimate(cfg, gpus, gpu_memory)
    t = cfg.training
    table = Table(
        title=f"GPU memory, float32 estimate (bf16 autocast needs less): per-process batch {estimate.batch} "
        f"({t.batch_size} over {gpus} GPU{'s' if gpus > 1 else ''})"
    )
    table.add_column("what")
    table.add_column("peak", justify="right")
    table.add_column("per example", justify="right")
    for name, peak, per in estimate.rows:
        table.add_row(name, format_bytes(peak), format_bytes(per) if per else "")
    if gpu_memory is not None:
        table.add_section()
        options = {"attack_chunk": "--attack-chunk", "micro_batch": "--micro-batch", "eval_batch": "eval --batch-size"}
        for key, value in estimate.fits.items():
            table.add_row(f"largest {options[key]} within {gpu_memory}", str(value) if value else "none fits", "")
    return table
