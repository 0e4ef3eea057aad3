"""A preset (recipe) described without training anything: what ``carso info`` shows.

Module sizes and parameter counts (built on the meta device), the candidate and chosen representation
layers, what the preset implies for training (``derived``: attack strengths, adversarially-balanced
batch counts, schedules), how two presets differ, and the estimated peak GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from carso_cli.config import Config, config_to_dict, eps_scale
from carso_cli.display import count_parameters
from carso_cli.models import Purifier, build_classifier, purifier_spec_for
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


def module_sizes(cfg: Config) -> tuple[list[ModuleSize], list[tuple[str, tuple[int, ...]]]]:
    """Module sizes of the preset's classifier and purifier, built on the meta device (no memory), and
    the representation layers with their (C, H, W) shapes."""
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


@dataclass
class CandidateLayer:
    name: str
    shape: tuple[int, ...]  # (C, H, W)
    index: int | None  # its place in the representation (execution order); None: not chosen
    too_small: bool  # side ≤ 2 × layerwise_depth: too small for the layerwise encoder (Tables 8/9)


def candidate_layers(cfg: Config, layers: list[tuple[str, tuple[int, ...]]]) -> list[CandidateLayer]:
    """Every candidate layer (image-shaped output) of the preset's classifier; ``layers``: the chosen ones."""
    with torch.device("meta"):
        classifier = build_classifier(cfg)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    chosen = {name: i for i, (name, _) in enumerate(layers)}
    too_small = 2 * cfg.purifier.layerwise_depth
    return [
        CandidateLayer(c.name, tuple(c.shape), chosen.get(c.name), min(c.shape[1:]) <= too_small)
        for c in candidates(classifier, shape)
    ]


@dataclass
class MemoryEstimate:
    batch: int  # per process
    rows: list[tuple[str, int, int | None]]  # (what, peak bytes, bytes per example)
    fits: dict[str, int | None]  # option → the largest value within the budget (with a GPU's memory)


def memory_estimate(cfg: Config, gpus: int = 1, gpu_memory: str | None = None) -> MemoryEstimate:
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
    pe = fp.per_example
    # "auto" bounds are chosen at run time from free memory: estimate the unbounded step, and the
    # fits (gpu_memory) say what fits.
    chunk, micro = (
        None if v == "auto" else memory.parse_chunk(v, k)
        for k, v in (("training.attack_chunk", t.attack_chunk), ("training.micro_batch", t.micro_batch))
    )
    step = memory.estimate_training(fp, batch, attacked, chunk, micro)  # type: ignore[arg-type]
    eval_batch = 64
    rows: list[tuple[str, int, int | None]] = [
        (f"training: attacks ({step.attack_chunk} at once)", step.attack_phase, pe.attack),
        (
            f"training: representation + purifier ({step.micro_batch} at once)",
            step.purifier_phase,
            pe.representation + pe.purifier,
        ),
        ("training step peak", step.peak, None),
        (
            f"evaluation: attack step on CARSO, batch {eval_batch}, {cfg.inference.samples} samples",
            memory.estimate_evaluation(fp, eval_batch),
            pe.evaluation,
        ),
    ]
    fits = memory.fitting_options(fp, memory.parse_size(gpu_memory), batch) if gpu_memory is not None else {}
    return MemoryEstimate(batch, rows, fits)
