"""The classifier's representation (clean and, optionally, attacked) saved to safetensors: what
``carso extract`` runs.

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
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from carso_cli import checkpoint as ckpt
from carso_cli import evaluation as ev
from carso_cli.classnames import run_class_names
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


class Perturbation(str, Enum):
    """What the inputs go through before their representation is taken a second time (``--attack``):
    the preset's FGSM or PGD on the classifier (not the evaluation's attacks, which target CARSO)."""

    none = "none"
    fgsm = "fgsm"
    pgd = "pgd"


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


@dataclass
class _Collected:
    """What the batches leave, per layer where it is a list of lists (one per layer)."""

    clean: list[list[torch.Tensor]]
    adversarial: list[list[torch.Tensor]]
    changes: list[list[torch.Tensor]]
    inputs: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    adversarial_inputs: list[torch.Tensor] = field(default_factory=list)
    correct: int = 0
    adversarial_correct: int = 0


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


def relative_change(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """‖adv − clean‖₂ / ‖clean‖₂ per example (flattened). (B, …) → (B,); 0/0 counts as 0."""
    diff = (adv.float() - clean.float()).flatten(1).norm(dim=1)
    ref = clean.float().flatten(1).norm(dim=1)
    return torch.where(ref > 0, diff / ref.clamp_min(1e-30), torch.where(diff > 0, torch.inf, 0.0))


def classifier_options(
    run_dir: Path | None,
    preset: str | None,
    sets: list[str] | None,
    classifier: str | Path | None,
    weights: Path | None,
) -> tuple[list[str] | None, Path | None]:
    """``--run`` or ``--preset`` with ``--classifier`` / ``--classifier-weights``, as (``--set`` overrides,
    the weights file or None): ``--classifier`` is what ``train-purifier`` takes (``sources.option_sets``: a
    weights file, a published model's name, or a source whose weights come from ``--classifier-weights``).
    ``--preset`` alone is fine when the source brings its weights (robustbench:, python:); ``load_source``
    says which source needs a file."""
    from carso_cli import zoo
    from carso_cli.models import sources

    if preset is None:
        given = [option for option, v in (("--classifier", classifier), ("--classifier-weights", weights)) if v]
        if given:
            raise CarsoError(f"{given[0]} needs --preset (or use --run DIR: a run keeps its classifier)")
        return sets, None
    if run_dir is not None:
        raise CarsoError("give either --run or --preset (with its classifier), not both")
    sets, file = sources.option_sets(sets, classifier, weights)  # a source sets classifier.architecture
    return sets, zoo.resolve_weights(file)  # a path, or a published model's name (carso pull --list)


def load_source(
    run_dir: Path | None, cfg: Config | None, classifier_path: Path | None, device: torch.device
) -> tuple[Config, torch.nn.Module, str, Path | None]:
    """(config, classifier, what it came from, the run directory or None): a preset's ``cfg`` with its
    classifier (any source: ``classifier_path`` its weights, None when the source brings them), or a run
    (default: the latest)."""
    from carso_cli.models import sources

    if cfg is not None:
        loaded = sources.load(cfg, classifier_path, device)
        said = loaded.source if classifier_path is None else f"{loaded.source} ({classifier_path})"
        return cfg, loaded.model, str(classifier_path) if loaded.source == "wideresnet" else said, None
    run = ckpt.resolve_run(run_dir, require=None)
    cfg = load_config(run / ckpt.CONFIG_FILE)
    return cfg, sources.load_saved(ckpt.classifier_path_of(run), cfg, device), str(run), run  # any source


def _check(out: Path, dtype: str, attack: str, n_examples: int | None, batch_size: int) -> None:
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


def run(
    out: Path,
    *,
    run_dir: Path | None = None,
    cfg: Config | None = None,
    classifier: Path | None = None,
    split: str = "test",
    n_examples: int | None = 256,
    attack: str = "none",
    eps: str | float | None = None,
    layers: list[str] | str | None = None,
    dtype: str = "float32",
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
    data_root: Path = Path("data"),
    console: Any = None,
) -> ExtractResult:
    """Extract representations to ``out`` (.safetensors); returns the per-layer summary.

    The classifier is the preset ``cfg``'s (``classifier``: its weights, None when its source brings them;
    ``classifier_options`` reads the command's options), or the run ``run_dir``'s (default: the latest
    under ./runs). ``console`` (a rich Console, or None) receives one line before the work.
    """
    from carso_cli.data import build_dataset

    out = Path(out)
    _check(out, dtype, attack, n_examples, batch_size)
    dev = torch.device(device)
    cfg, model, source, run_path = load_source(run_dir, cfg, classifier, dev)
    class_names = run_class_names(run_path, cfg, data_root)  # index-aligned with ``labels``; None: unknown
    names, shapes = _layers(model, cfg, layers)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    eps_value = None if attack == "none" else (cfg.attacks.eps if eps is None else parse_eps(eps, "--eps"))
    dataset = build_dataset(cfg, split, root=str(data_root), augment=False)
    n = len(dataset) if n_examples is None else min(n_examples, len(dataset))
    if console is not None:
        size = _file_size(n, shapes, shape, dtype, attacked=attack != "none")
        said = f" ε = {format_eps(eps_value)}" if eps_value is not None else ""
        console.print(
            f"[bold]carso extract[/] {escape(str(source))} — {n} {split} examples, {len(names)} layers, "
            f"attack {attack}{said}, ≈ {size / 2**20:.1f} MiB ({dtype})",
            highlight=False,
        )
    got = _collect(model, names, dataset, n, batch_size, attack, eps_value, cfg, seed, dtype, dev)
    rows, tensors = _tensors(got, names, shapes, attacked=attack != "none")
    facts = {"source": source, "preset": cfg.name, "split": split, "n": n, "attack": attack, "dtype": dtype}
    metadata = _metadata(facts, names, eps_value, seed, rows, class_names)
    ckpt.save_tensors(out, tensors, metadata)
    adversarial_accuracy = got.adversarial_correct / n if attack != "none" else None
    return ExtractResult(out, n, rows, attack, eps_value, out.stat().st_size, got.correct / n, adversarial_accuracy)


def _layers(model: torch.nn.Module, cfg: Config, layers: list[str] | str | None) -> tuple[list[str], list[Any]]:
    """The model frozen in eval mode; (layer names in execution order, their (C, H, W) shapes)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    names = resolve_layers(
        model, cfg.purifier.layers if layers is None else layers, shape, min_side=2 * cfg.purifier.layerwise_depth
    )  # unknown → clear error
    names = execution_order(model, names, shape)
    return names, representation_shapes(model, names, shape)


def _metadata(
    facts: dict[str, Any],
    names: list[str],
    eps: float | None,
    seed: int,
    rows: list[LayerRow],
    class_names: list[str] | None,
) -> dict[str, str]:
    """The file's metadata (strings, as safetensors keeps them): see the module's docstring."""
    return {
        "format": "carso-representation/1",
        "source": facts["source"],
        "preset": facts["preset"],
        "split": facts["split"],
        "n": str(facts["n"]),
        "layers": json.dumps(names),
        "attack": facts["attack"],
        "eps": "" if eps is None else repr(eps),
        "dtype": facts["dtype"],
        "seed": str(seed),
        "relative_change": json.dumps({r.name: r.relative_change for r in rows}),
        **({"class_names": json.dumps(class_names)} if class_names is not None else {}),
    }


def _file_size(n: int, shapes: list[Any], shape: tuple[int, int, int], dtype: str, attacked: bool) -> int:
    """About how many bytes the file will hold: the representation in ``dtype``, the inputs in float32."""
    per_example = sum(int(torch.tensor(s).prod()) for s in shapes) * (2 if attacked else 1)
    return n * (per_example * DTYPES[dtype].itemsize + (2 if attacked else 1) * int(torch.tensor(shape).prod()) * 4)


def _collect(
    model: torch.nn.Module,
    names: list[str],
    dataset: Any,
    n: int,
    batch_size: int,
    attack: str,
    eps: float | None,
    cfg: Config,
    seed: int,
    dtype: str,
    dev: torch.device,
) -> _Collected:
    """The representation of the first ``n`` examples, batch by batch (and of their attacked versions)."""
    from carso_cli.attacks import fgsm, pgd

    got = _Collected([[] for _ in names], [[] for _ in names], [[] for _ in names])
    gen = torch.Generator().manual_seed(ev.example_seed(seed, "extract", bits=31))
    a = cfg.attacks
    for rng in ev.batch_ranges(n, batch_size):
        x, y = ev.load_examples(dataset, rng)
        x, y = x.to(dev), y.to(dev)
        with torch.no_grad():
            logits, rep = forward_with_representation(model, names, x, keep_graph=False)
        got.correct += int((logits.argmax(1) == y).sum())
        got.inputs.append(x.cpu())
        got.labels.append(y.cpu())
        for i, r in enumerate(rep):
            got.clean[i].append(r.to("cpu", DTYPES[dtype]))
        if attack == "none" or eps is None:
            continue
        if attack == "fgsm":
            x_adv = fgsm(model, x, y, eps)
        else:
            x_adv = pgd(model, x, y, eps, a.pgd_steps, a.pgd_step_size, random_start=a.pgd_random_start, generator=gen)
        with torch.no_grad():
            logits_adv, rep_adv = forward_with_representation(model, names, x_adv, keep_graph=False)
        got.adversarial_correct += int((logits_adv.argmax(1) == y).sum())
        got.adversarial_inputs.append(x_adv.cpu())
        for i, (r, r_adv) in enumerate(zip(rep, rep_adv)):
            got.adversarial[i].append(r_adv.to("cpu", DTYPES[dtype]))
            got.changes[i].append(relative_change(r, r_adv).cpu())
    return got


def _tensors(
    got: _Collected, names: list[str], shapes: list[Any], attacked: bool
) -> tuple[list[LayerRow], dict[str, torch.Tensor]]:
    """The per-layer summary and the file's named tensors."""
    tensors: dict[str, torch.Tensor] = {"inputs": torch.cat(got.inputs), "labels": torch.cat(got.labels)}
    rows = []
    for i, name in enumerate(names):
        tensors[f"representation/{name}"] = torch.cat(got.clean[i])
        change = None
        if attacked:
            tensors[f"adversarial_representation/{name}"] = torch.cat(got.adversarial[i])
            change = float(torch.cat(got.changes[i]).mean())
        rows.append(LayerRow(name, tuple(shapes[i]), change))
    if attacked:
        tensors["adversarial_inputs"] = torch.cat(got.adversarial_inputs)
    return rows, tensors
