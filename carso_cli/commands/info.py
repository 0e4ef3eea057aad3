"""``carso info``: a preset's modules, representation layers, sizes and parameter counts (a dry run);
``--json``: the resolved preset and what it implies (``derived``); ``--diff B``: how two recipes differ."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import typer
from rich.markup import escape
from rich.table import Table

from carso_cli.commands._common import PresetOpt, SetOpt, load_preset
from carso_cli.config import Config, config_to_dict, eps_scale
from carso_cli.display import count_parameters
from carso_cli.models import Purifier, build_classifier, purifier_spec_for, sources
from carso_cli.models.representation import candidates


@dataclass
class ModuleSize:
    name: str
    shape: str
    parameters: int
    used_at_inference: bool


def _classifier_name(cfg: Config) -> str:
    c = cfg.classifier
    return f"WideResNet-{c.depth}-{c.width}" if c.architecture == "wideresnet" else c.architecture


def run(cfg: Config) -> tuple[list[ModuleSize], list[tuple[str, tuple[int, ...]]]]:
    """Module sizes of the preset's classifier and purifier, built on the meta device (no memory)."""
    with torch.device("meta"):
        classifier = build_classifier(cfg)
    spec = purifier_spec_for(cfg, classifier)
    with torch.device("meta"):
        purifier = Purifier(spec)
    assert purifier.input_encoder is not None and purifier.joint_encoder is not None
    enc = purifier.condition_encoder
    rows = [
        ModuleSize(
            f"classifier ({_classifier_name(cfg)})",
            f"{cfg.data.channels}×{cfg.data.image_size}×{cfg.data.image_size} → {cfg.data.num_classes}",
            count_parameters(classifier),
            True,
        ),
        ModuleSize(
            "purifier.input_encoder (Table 6)",
            f"→ {purifier.input_encoder.out_features}",
            count_parameters(purifier.input_encoder),
            False,
        ),
        ModuleSize(
            f"purifier.condition_encoder.layerwise ×{len(spec.layers)} (Tables 8/9)",
            f"→ {enc.in_features}",
            sum(count_parameters(m) for m in enc.layerwise),
            True,
        ),
        ModuleSize(
            "purifier.condition_encoder.fc (Table 10)",
            f"{enc.in_features} → {spec.fcrepr}",
            count_parameters(enc.fc),
            True,
        ),
        ModuleSize(
            "purifier.joint_encoder (Table 11)",
            f"{purifier.input_encoder.out_features}+{spec.fcrepr} → 2×{spec.fjoint}",
            count_parameters(purifier.joint_encoder),
            False,
        ),
        ModuleSize(
            "purifier.decoder (Tables 12/13)",
            f"{spec.fjoint}+{spec.fcrepr} → {spec.channels}×{spec.image_size}×{spec.image_size}",
            count_parameters(purifier.decoder),
            True,
        ),
    ]
    layers = [(name, tuple(shape)) for name, shape in zip(spec.layers, spec.layer_shapes)]
    return rows, layers


def derived(cfg: Config, gpus: int = 1) -> dict[str, Any]:
    """What the preset implies for training, as the training code computes it (for users and scripts).

    ``train_attacks``: the four groups of a balanced batch (section 4.4) with their pixel ε;
    ``adversarial_per_attack``: examples per group in the first process's share of a global batch on
    ``gpus`` processes; ``lr_per_epoch`` / ``beta_per_epoch``: one value per epoch (from 0).
    """
    from carso_cli import training as tr
    from carso_cli.distributed import shard

    t, a = cfg.training, cfg.attacks
    strengths = tr.attack_strengths(a, eps_scale(cfg))
    attacks = [
        {
            "group": g,
            "kind": g.split()[0],
            "eps_pixel": e,
            "steps": 1 if g.startswith("FGSM") else a.pgd_steps,
            "step_size": e if g.startswith("FGSM") else a.pgd_step_size,
        }
        for g, e in zip(tr.ATTACK_GROUPS, strengths)
    ]
    count = tr.adversarial_count(t.batch_size, t.adversarial_fraction, t.adversarial_count, t.reference_world_size)
    part = shard(t.batch_size, 0, gpus)
    plan = tr.balanced_batch_plan(t.batch_size, t.adversarial_fraction, count).slice(part.start, part.stop)
    return {
        "gpus": gpus,
        "train_attacks": attacks,
        "adversarial_per_attack": list(plan.counts),
        "lr_per_epoch": [tr.lr_at_epoch(t, e) for e in range(t.epochs)],
        "beta_per_epoch": [tr.beta_at_epoch(t, e) for e in range(t.epochs)],
    }


def flat_keys(cfg: Config) -> dict[str, Any]:
    """The resolved preset as dotted keys (``training.schedule``), the labels ``name``/``description`` left out."""
    out: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
    return out


def diff(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every resolved key whose values differ."""
    fa, fb = flat_keys(a), flat_keys(b)
    return [(k, fa[k], fb[k]) for k in fa if fa[k] != fb[k]]


def cli(
    preset: PresetOpt = "cifar10",
    set_: SetOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the resolved preset and a 'derived' block as JSON.")
    ] = False,
    diff_with: Annotated[
        str | None,
        typer.Option("--diff", metavar="PRESET", help="List the resolved keys that differ from this preset's."),
    ] = None,
    gpus: Annotated[
        int,
        typer.Option(
            "--gpus",
            min=1,
            help="Processes (the per-process batch of derived.adversarial_per_attack and the memory estimate).",
        ),
    ] = 1,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            "--gpu-memory",
            help=(
                "A GPU's memory, e.g. 80GB or 80GiB: print the largest --attack-chunk / --micro-batch / eval batch "
                "that fit it."
            ),
        ),
    ] = None,
    show_memory: Annotated[
        bool,
        typer.Option(
            "--memory/--no-memory",
            help="Estimate peak GPU memory (measures activations on the CPU: a few seconds at full size).",
        ),
    ] = True,
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
        table = Table(title=f"{len(rows)} resolved keys differ")
        table.add_column("key")
        table.add_column(escape(cfg.name))
        table.add_column(escape(other.name))
        for k, va, vb in rows:
            table.add_row(k, escape(json.dumps(va)), escape(json.dumps(vb)))
        console.print(table)
        return
    if as_json:
        typer.echo(json.dumps({**config_to_dict(cfg), "derived": derived(cfg, gpus)}, indent=2))
        return
    rows, layers = run(cfg)
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
    console.print(table)
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


def layer_table(cfg: Config, layers: list[tuple[str, tuple[int, ...]]]) -> Table:
    """Every candidate layer (image-shaped output) with its shape; the chosen ones numbered in execution order."""
    with torch.device("meta"):
        classifier = build_classifier(cfg)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    chosen = {name: i for i, (name, _) in enumerate(layers)}
    table = Table(
        title="candidate layers (image-shaped outputs); #: the representation's, in execution order; "
        f"too small: side ≤ {2 * cfg.purifier.layerwise_depth} (the layerwise encoder's minimum)"
    )
    table.add_column("#", justify="right")
    table.add_column("layer")
    table.add_column("C×H×W")
    too_small = 2 * cfg.purifier.layerwise_depth
    for c in candidates(classifier, shape):
        note = "" if min(c.shape[1:]) > too_small else " (too small)"  # for the layerwise encoder (Tables 8/9)
        table.add_row(
            str(chosen[c.name]) if c.name in chosen else "", escape(c.name), "×".join(map(str, c.shape)) + note
        )
    return table


def memory_table(cfg: Config, gpus: int = 1, gpu_memory: str | None = None) -> Table:
    """Estimated peak GPU memory of one training step and one evaluation batch at the preset's sizes.

    Activations are measured (bytes autograd saves per example, float32, on the CPU); with
    ``gpu_memory`` the largest ``--attack-chunk`` / ``--micro-batch`` / eval batch that fit it.
    """
    from carso_cli import memory

    fp = memory.measure(cfg)
    t = cfg.training
    batch = max(1, t.batch_size // max(1, gpus))
    # FGSM and PGD run as two calls (training.batches): at most half the perturbed examples at once.
    attacked = -(-round(t.adversarial_fraction * batch) // 2)
    table = Table(
        title=f"GPU memory, float32 estimate (bf16 autocast needs less): per-process batch {batch} "
        f"({t.batch_size} over {gpus} GPU{'s' if gpus > 1 else ''})"
    )
    table.add_column("what")
    table.add_column("peak", justify="right")
    table.add_column("per example", justify="right")

    def row(name: str, peak: int, per: int | None = None) -> None:
        table.add_row(name, memory.format_bytes(peak), memory.format_bytes(per) if per else "")

    pe = fp.per_example
    # "auto" bounds are chosen at run time from free memory: estimate the unbounded step, and the table
    # below (--gpu-memory) says what fits.
    chunk, micro = (
        None if v == "auto" else memory.parse_chunk(v, k)
        for k, v in (
            ("training.attack_chunk", cfg.training.attack_chunk),
            ("training.micro_batch", cfg.training.micro_batch),
        )
    )
    step = memory.estimate_training(fp, batch, attacked, chunk, micro)  # type: ignore[arg-type]
    row(f"training: attacks ({step.attack_chunk} at once)", step.attack_phase, pe.attack)
    row(
        f"training: representation + purifier ({step.micro_batch} at once)",
        step.purifier_phase,
        pe.representation + pe.purifier,
    )
    row("training step peak", step.peak)
    eval_batch = 64
    row(
        f"evaluation: attack step on CARSO, batch {eval_batch}, {cfg.inference.samples} samples",
        memory.estimate_evaluation(fp, eval_batch),
        pe.evaluation,
    )
    if gpu_memory is not None:
        budget = memory.parse_size(gpu_memory)
        fits = memory.fitting_options(fp, budget, batch)
        table.add_section()
        for key, value in fits.items():
            option = {
                "attack_chunk": "--attack-chunk",
                "micro_batch": "--micro-batch",
                "eval_batch": "eval --batch-size",
            }[key]
            table.add_row(f"largest {option} within {gpu_memory}", str(value) if value else "none fits", "")
    return table
