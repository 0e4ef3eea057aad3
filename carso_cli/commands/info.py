"""``carso info``: a preset's modules, representation layers, sizes and parameter counts (a dry run)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.table import Table

from carso_cli.commands._common import PresetOpt, SetOpt, load_preset
from carso_cli.config import Config
from carso_cli.models import Purifier, build_classifier, purifier_spec_for


@dataclass
class ModuleSize:
    name: str
    shape: str
    parameters: int
    used_at_inference: bool


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
        ModuleSize("classifier (WideResNet-%d-%d)" % (cfg.classifier.depth, cfg.classifier.width),
                   f"{cfg.data.channels}×{cfg.data.image_size}×{cfg.data.image_size} → {cfg.data.num_classes}",
                   _count(classifier), True),
        ModuleSize("purifier.input_encoder (Table 6)", f"→ {purifier.input_encoder.out_features}",
                   _count(purifier.input_encoder), False),
        ModuleSize(f"purifier.condition_encoder.layerwise ×{len(spec.layers)} (Tables 8/9)",
                   f"→ {enc.in_features}", sum(_count(m) for m in enc.layerwise), True),
        ModuleSize("purifier.condition_encoder.fc (Table 10)",
                   f"{enc.in_features} → {spec.fcrepr}", _count(enc.fc), True),
        ModuleSize("purifier.joint_encoder (Table 11)",
                   f"{purifier.input_encoder.out_features}+{spec.fcrepr} → 2×{spec.fjoint}",
                   _count(purifier.joint_encoder), False),
        ModuleSize("purifier.decoder (Tables 12/13)",
                   f"{spec.fjoint}+{spec.fcrepr} → {spec.channels}×{spec.image_size}×{spec.image_size}",
                   _count(purifier.decoder), True),
    ]
    layers = [(name, tuple(shape)) for name, shape in zip(spec.layers, spec.layer_shapes)]
    return rows, layers


def cli(preset: PresetOpt = "cifar10", set_: SetOpt = None) -> None:
    """Show a preset's modules, representation layers and parameter counts (nothing is trained)."""
    from carso_cli.cli import console

    cfg = load_preset(preset, set_)
    rows, layers = run(cfg)
    table = Table(title=f"carso info — preset '{cfg.name}' ({cfg.description})")
    table.add_column("module")
    table.add_column("shape")
    table.add_column("parameters", justify="right")
    table.add_column("inference", justify="center")
    for r in rows:
        table.add_row(r.name, r.shape, f"{r.parameters:,}", "✓" if r.used_at_inference else "training only")
    purifier_total = sum(r.parameters for r in rows[1:])
    inference_total = sum(r.parameters for r in rows[1:] if r.used_at_inference)
    table.add_section()
    table.add_row("purifier total", "", f"{purifier_total:,}", "")
    table.add_row("purifier at inference", "", f"{inference_total:,}", "")
    console.print(table)
    lt = Table(title=f"representation: {len(layers)} layers (execution order)")
    lt.add_column("#", justify="right")
    lt.add_column("layer")
    lt.add_column("C×H×W")
    for i, (name, shape) in enumerate(layers):
        lt.add_row(str(i), name, "×".join(map(str, shape)))
    console.print(lt)


def memory_table(cfg: Config, gpus: int = 1, gpu_memory: str | None = None) -> Table:
    """Estimated peak GPU memory of one training step and one evaluation batch at the preset's sizes.

    Activations are measured (bytes autograd saves per example, float32, on the CPU); with
    ``gpu_memory`` the largest ``--attack-chunk`` / ``--micro-batch`` / eval batch that fit it.
    """
    from carso_cli import memory

    fp = memory.measure(cfg)
    t = cfg.training
    batch = max(1, t.batch_size // max(1, gpus))
    attacked = round(t.adversarial_fraction * batch)
    table = Table(title=f"GPU memory, float32 estimate (bf16 autocast needs less): per-process batch {batch} "
                        f"({t.batch_size} over {gpus} GPU{'s' if gpus > 1 else ''})")
    table.add_column("what")
    table.add_column("peak", justify="right")
    table.add_column("per example", justify="right")

    def row(name: str, peak: int, per: int | None = None) -> None:
        table.add_row(name, memory.format_bytes(peak), memory.format_bytes(per) if per else "")

    pe = fp.per_example
    step = memory.estimate_training(fp, batch, attacked, cfg.training.attack_chunk, cfg.training.micro_batch)
    row(f"training: attacks ({step.attack_chunk} at once)", step.attack_phase, pe.attack)
    row(f"training: representation + purifier ({step.micro_batch} at once)", step.purifier_phase,
        pe.representation + pe.purifier)
    row("training step peak", step.peak)
    eval_batch = 64
    row(f"evaluation: attack step on CARSO, batch {eval_batch}, {cfg.inference.samples} samples",
        memory.estimate_evaluation(fp, eval_batch), pe.evaluation)
    if gpu_memory is not None:
        budget = memory.parse_size(gpu_memory)
        fits = memory.fitting_options(fp, budget, batch)
        table.add_section()
        for key, value in fits.items():
            option = {"attack_chunk": "--attack-chunk", "micro_batch": "--micro-batch", "eval_batch": "eval --batch-size"}[key]
            table.add_row(f"largest {option} within {gpu_memory}", str(value) if value else "none fits", "")
    return table
