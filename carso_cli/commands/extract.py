"""``carso extract``: save the classifier's representation (clean and, optionally, attacked) to safetensors.

What the paper's open question — restricting the representation to fewer layers — needs: for every
layer, the activations on clean inputs and on adversarial ones, and how much the attack changes them
(mean relative L2 change ‖r(x_adv) − r(x)‖₂ / ‖r(x)‖₂ per example).

File layout (one named tensor per layer; layer names as in Table 7):
  ``inputs`` (N, C, H, W), ``labels`` (N,), ``representation/<layer>`` (N, C_l, H_l, W_l);
  when attacked also ``adversarial_inputs`` and ``adversarial_representation/<layer>``.
  Metadata: the layers in execution order (JSON list), attack, ε, preset, split, dtype, relative changes,
  and ``class_names`` (JSON list, index-aligned with ``labels``) when the run or dataset has names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from carso_cli import checkpoint as ckpt
from carso_cli import evaluation as ev
from carso_cli.classnames import run_class_names
from carso_cli.commands._common import (
    DataRootOpt,
    DeviceOpt,
    RunOpt,
    SeedOpt,
    SetOpt,
    load_preset,
    resolve_device,
)
from carso_cli.config import Config, load_config, parse_eps
from carso_cli.display import format_eps
from carso_cli.errors import CarsoError
from carso_cli.models.representation import (
    execution_order,
    forward_with_representation,
    representation_shapes,
    resolve_layers,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Attack(str, Enum):
    none = "none"
    fgsm = "fgsm"
    pgd = "pgd"


class Split(str, Enum):
    train = "train"
    test = "test"


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, ...]  # (C, H, W) per example
    relative_change: float | None  # mean over examples of ‖Δr‖₂ / ‖r‖₂; None without attack


@dataclass
class ExtractResult:
    path: Path
    n: int
    layers: list[LayerRow]
    attack: str
    eps: float | None
    bytes: int
    clean_accuracy: float
    adversarial_accuracy: float | None


def parse_layers(values: list[str] | None) -> list[str] | str | None:
    """``--layers a,b --layers c`` → [a, b, c]; a single ``rule:…`` stays a rule; None → the preset's."""
    if not values:
        return None
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if len(names) == 1 and names[0].startswith("rule:"):
        return names[0]
    if any(n.startswith("rule:") for n in names):
        raise CarsoError("a layer rule (rule:…) cannot be mixed with layer names")
    return names


def _load(
    run_dir: Path | None, preset: str | None, classifier_path: Path | None, sets: list[str] | None, device: torch.device
) -> tuple[Config, torch.nn.Module, str, Path | None]:
    """(config, classifier, what it came from, the run directory or None)."""
    from carso_cli.models import load_classifier, sources

    if classifier_path is not None or preset is not None:
        if run_dir is not None:
            raise CarsoError("give either --run or --preset with --classifier, not both")
        if classifier_path is None or preset is None:
            raise CarsoError("--preset and --classifier go together (or use --run DIR)")
        cfg = load_preset(preset, sets)
        return cfg, load_classifier(cfg, classifier_path, device), str(classifier_path), None
    run = ckpt.resolve_run(run_dir, require=None)
    cfg = load_config(run / ckpt.CONFIG_FILE)
    return cfg, sources.load_saved(ckpt.classifier_path_of(run), cfg, device), str(run), run  # any source


def relative_change(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """‖adv − clean‖₂ / ‖clean‖₂ per example (flattened). (B, …) → (B,); 0/0 counts as 0."""
    diff = (adv.float() - clean.float()).flatten(1).norm(dim=1)
    ref = clean.float().flatten(1).norm(dim=1)
    return torch.where(ref > 0, diff / ref.clamp_min(1e-30), torch.where(diff > 0, torch.inf, 0.0))


def run(
    out: Path,
    *,
    run_dir: Path | None = None,
    preset: str | None = None,
    classifier: Path | None = None,
    sets: list[str] | None = None,
    split: str = "test",
    n_examples: int | None = 256,
    attack: str = "none",
    eps: str | float | None = None,
    layers: list[str] | str | None = None,
    dtype: str = "float32",
    batch_size: int = 128,
    seed: int = 0,
    device: str | None = None,
    data_root: Path = Path("data"),
    console: Console | None = None,
) -> ExtractResult:
    """Extract representations to ``out`` (.safetensors); returns the per-layer summary."""
    from carso_cli.attacks import fgsm, pgd
    from carso_cli.data import build_dataset

    out = Path(out)
    if out.suffix != ".safetensors":
        raise CarsoError(f"--out must name a .safetensors file, got {out}")
    if dtype not in DTYPES:
        raise CarsoError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if attack not in ("none", "fgsm", "pgd"):
        raise CarsoError(f"unknown attack '{attack}' (none, fgsm or pgd)")
    if n_examples is not None and n_examples < 1:
        raise CarsoError(f"--n-examples must be at least 1, got {n_examples}")
    if batch_size < 1:
        raise CarsoError(f"--batch-size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    cfg, model, source, run_path = _load(run_dir, preset, classifier, sets, dev)
    class_names = run_class_names(run_path, cfg, data_root)  # index-aligned with ``labels``; None: unknown
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    names = resolve_layers(
        model,
        cfg.purifier.layers if layers is None else layers,
        shape,  # unknown → clear error
        min_side=2 * cfg.purifier.layerwise_depth,
    )
    names = execution_order(model, names, shape)
    shapes = representation_shapes(model, names, shape)
    eps_value = None if attack == "none" else (cfg.attacks.eps if eps is None else parse_eps(eps, "--eps"))
    dataset = build_dataset(cfg, split, root=str(data_root), augment=False)
    n = len(dataset) if n_examples is None else min(n_examples, len(dataset))
    per_example = sum(int(torch.tensor(s).prod()) for s in shapes) * (2 if attack != "none" else 1)
    size = n * (
        per_example * DTYPES[dtype].itemsize + (2 if attack != "none" else 1) * int(torch.tensor(shape).prod()) * 4
    )
    if console is not None:
        console.print(
            f"[bold]carso extract[/] {escape(str(source))} — {n} {split} examples, {len(names)} layers, attack {attack}"
            + (f" ε = {format_eps(eps_value)}" if eps_value is not None else "")
            + f", ≈ {size / 2**20:.1f} MiB ({dtype})",
            highlight=False,
        )
    clean_parts: list[list[torch.Tensor]] = [[] for _ in names]
    adv_parts: list[list[torch.Tensor]] = [[] for _ in names]
    inputs, labels, adv_inputs, changes = [], [], [], [[] for _ in names]
    correct = adv_correct = 0
    gen = torch.Generator().manual_seed(ev.example_seed(seed, "extract", bits=31))
    a = cfg.attacks
    for rng in ev.batch_ranges(n, batch_size):
        x, y = ev.load_examples(dataset, rng)
        x, y = x.to(dev), y.to(dev)
        with torch.no_grad():
            logits, rep = forward_with_representation(model, names, x, keep_graph=False)
        correct += int((logits.argmax(1) == y).sum())
        inputs.append(x.cpu())
        labels.append(y.cpu())
        for i, r in enumerate(rep):
            clean_parts[i].append(r.to("cpu", DTYPES[dtype]))
        if attack != "none":
            assert eps_value is not None
            if attack == "fgsm":
                x_adv = fgsm(model, x, y, eps_value)
            else:
                x_adv = pgd(
                    model, x, y, eps_value, a.pgd_steps, a.pgd_step_size, random_start=a.pgd_random_start, generator=gen
                )
            with torch.no_grad():
                logits_adv, rep_adv = forward_with_representation(model, names, x_adv, keep_graph=False)
            adv_correct += int((logits_adv.argmax(1) == y).sum())
            adv_inputs.append(x_adv.cpu())
            for i, (r, r_adv) in enumerate(zip(rep, rep_adv)):
                adv_parts[i].append(r_adv.to("cpu", DTYPES[dtype]))
                changes[i].append(relative_change(r, r_adv).cpu())
    tensors: dict[str, torch.Tensor] = {"inputs": torch.cat(inputs), "labels": torch.cat(labels)}
    rows = []
    for i, name in enumerate(names):
        tensors[f"representation/{name}"] = torch.cat(clean_parts[i])
        change = None
        if attack != "none":
            tensors[f"adversarial_representation/{name}"] = torch.cat(adv_parts[i])
            change = float(torch.cat(changes[i]).mean())
        rows.append(LayerRow(name, tuple(shapes[i]), change))
    if attack != "none":
        tensors["adversarial_inputs"] = torch.cat(adv_inputs)
    metadata = {
        "format": "carso-representation/1",
        "source": source,
        "preset": cfg.name,
        "split": split,
        "n": str(n),
        "layers": json.dumps(names),
        "attack": attack,
        "eps": "" if eps_value is None else repr(eps_value),
        "dtype": dtype,
        "seed": str(seed),
        "relative_change": json.dumps({r.name: r.relative_change for r in rows}),
    }
    if class_names is not None:
        metadata["class_names"] = json.dumps(class_names)
    ckpt.save_tensors(out, tensors, metadata)
    result = ExtractResult(
        out, n, rows, attack, eps_value, out.stat().st_size, correct / n, adv_correct / n if attack != "none" else None
    )
    if console is not None:
        render(result, console)
    return result


def render(result: ExtractResult, console: Console) -> None:
    attacked = result.attack != "none"
    title = f"representation: {len(result.layers)} layers, {result.n} examples"
    if attacked:
        title += f" — {result.attack} at ε = {format_eps(result.eps or 0.0)}"
    t = Table(title=title)
    t.add_column("#", justify="right")
    t.add_column("layer")
    t.add_column("shape (N×C×H×W)")
    if attacked:
        t.add_column("mean relative L2 change", justify="right")
    for i, row in enumerate(result.layers):
        cells = [str(i), escape(row.name), "×".join(map(str, (result.n, *row.shape)))]
        if attacked:
            cells.append(f"{row.relative_change:.4f}")
        t.add_row(*cells)
    console.print(t)
    acc = f"classifier accuracy: clean {100 * result.clean_accuracy:.2f}%"
    if result.adversarial_accuracy is not None:
        acc += f", attacked {100 * result.adversarial_accuracy:.2f}%"
    console.print(acc)
    console.print(f"saved {result.path} ({result.bytes / 2**20:.1f} MiB)", highlight=False, markup=False)


def cli(
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file.")],
    run: RunOpt = None,
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="Preset (with --classifier) instead of a run.")
    ] = None,
    classifier: Annotated[
        Path | None,
        typer.Option(
            "--classifier", help="Classifier weights (with --preset), or a published model's name (carso pull --list)."
        ),
    ] = None,
    set_: SetOpt = None,
    split: Annotated[Split, typer.Option("--split", help="Dataset split.")] = Split.test,
    n_examples: Annotated[int | None, typer.Option("--n-examples", help="First N examples of the split.")] = 256,
    attack: Annotated[
        Attack, typer.Option("--attack", help="Perturb the inputs with FGSM or PGD (the preset's settings).")
    ] = Attack.none,
    eps: Annotated[str | None, typer.Option("--eps", help="ℓ∞ radius, e.g. 8/255 (default: the preset's).")] = None,
    layers: Annotated[
        list[str] | None,
        typer.Option(
            "--layers",
            help=(
                "Layer names, comma-separated or repeated, or rule:NAME (default: the preset's representation layers)."
            ),
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="float32, float16 or bfloat16 for the representation tensors.")
    ] = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per forward pass.")] = 128,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    data_root: DataRootOpt = Path("data"),
) -> None:
    """Save the classifier's representation (one tensor per layer), inputs, labels, and attacked inputs."""
    from carso_cli import zoo
    from carso_cli.cli import console

    classifier = zoo.resolve_weights(classifier)  # a path, or a published model's name (carso pull --list)
    run_fn(
        out,
        run_dir=run,
        preset=preset,
        classifier=classifier,
        sets=set_,
        split=split.value,
        n_examples=n_examples,
        attack=attack.value,
        eps=eps,
        layers=parse_layers(layers),
        dtype=dtype,
        batch_size=batch_size,
        seed=seed,
        device=device,
        data_root=data_root,
        console=console,
    )


run_fn = run
