"""``carso bench``: throughput of the real code paths (``carso_cli.benchmark``), for BENCHMARKS.md.

``train``: purifier training images/s; ``attack``: CARSO end-to-end gradient evaluations per second and
the randomized-AutoAttack time they imply. This module parses the options and prints the figures.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from carso_cli.benchmark import bench_attack, bench_train, environment
from carso_cli.commands._common import load_preset, memory_sets, resolve_device
from carso_cli.commands._options import AttackChunkOpt, CompileOpt, DeviceOpt, MicroBatchOpt, PresetOpt, SetOpt


class What(str, Enum):
    train = "train"
    attack = "attack"


def cli(
    what: Annotated[
        What, typer.Argument(help="train: purifier training images/s; attack: CARSO gradients/s.")
    ] = What.train,
    preset: PresetOpt = "cifar10",
    set_: SetOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch size (train: global batch).")] = 512,
    batches: Annotated[
        int, typer.Option("--batches", min=1, help="train: batches per timed epoch; attack: timed iterations.")
    ] = 10,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16", help="attack: bf16 autocast (CUDA).")] = False,
    device: DeviceOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a sentence.")] = False,
    attack_chunk: AttackChunkOpt = None,
    micro_batch: MicroBatchOpt = None,
    compile_: CompileOpt = None,
) -> None:
    """Measure throughput of the preset's full model on synthetic data (for BENCHMARKS.md)."""
    from carso_cli.cli import console, err_console
    from carso_cli.training import purifier

    sets = memory_sets(set_, attack_chunk, micro_batch) or []
    cfg = load_preset(preset, [*sets, f"training.compile={compile_}"] if compile_ is not None else sets)
    dev = resolve_device(device)
    env = environment(dev)
    if what is What.train:
        # With --json, stdout carries the JSON alone: training progress goes to stderr.
        result = bench_train(cfg, dev, batch_size, batches, purifier.run, console=err_console if json_out else console)
        headline = (
            f"{result['images_per_s']:,.0f} images/s, peak memory {result['peak_memory']} "
            f"(purifier training, preset {cfg.name})"
        )
    else:
        result = bench_attack(cfg, dev, batch_size, batches, bf16=bf16)
        headline = (
            f"{result['example_gradients_per_s']:,.1f} end-to-end example-gradients/s → randomized AutoAttack "
            f"on 10,000 examples ≤ {result['randaa_hours_for_10k_upper_bound']:,.1f} h, the adaptive "
            f"evaluation ≤ {result['adaptive_hours_for_10k_upper_bound']:,.1f} h, "
            f"peak memory {result['peak_memory']} (preset {cfg.name})"
        )
    if json_out:
        print(json.dumps({"what": what.value, "preset": cfg.name, **result, "environment": env}))
    else:
        console.print(headline, markup=False)
        console.print(json.dumps(result), style="dim", markup=False)
        console.print(json.dumps(env), style="dim", markup=False)
