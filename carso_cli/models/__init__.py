"""Models and how they are built: from a preset, from weight files, from a run directory."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli.config import Config, load_config
from carso_cli.errors import CheckpointError, ConfigError
from carso_cli.models import sources
from carso_cli.models.carso import CARSO, set_eval_frozen
from carso_cli.models.purifier import (
    Purifier,
    PurifierSpec,
    layerwise_channels,
    spec_from_config,
)
from carso_cli.models.representation import (
    execution_order,
    representation_shapes,
    resolve_layers,
)
from carso_cli.models.wideresnet import WideResNet

__all__ = [
    "CARSO",
    "LoadedRun",
    "Purifier",
    "PurifierSpec",
    "WideResNet",
    "build_classifier",
    "build_purifier",
    "load_classifier",
    "load_purifier",
    "load_run",
    "purifier_spec_for",
    "save_purifier",
    "set_eval_frozen",
    "write_run",
]


def build_classifier(cfg: Config) -> nn.Module:
    """The preset's classifier (any source, ``models.sources``), randomly initialised, [0, 1] inputs."""
    return sources.build(cfg)


def load_classifier(cfg: Config, path: str | Path | None, device: str | torch.device = "cpu") -> nn.Module:
    """The preset's classifier with weights from ``path`` (safetensors or .pt/.pth; None: the source's own
    loader, for robustbench: and python:), in eval mode."""
    return sources.load(cfg, path, device).model


def representation_features(shapes: list[tuple[int, ...]], depth: int) -> int:
    """Inputs of the FC representation encoder (Table 10): the flattened layerwise encoders' outputs."""
    return sum(layerwise_channels(c, depth)[-1] * max(h - 2 * depth, 0) * max(w - 2 * depth, 0) for c, h, w in shapes)


def check_representation(cfg: Config, layers: list[str], shapes: list[tuple[int, ...]]) -> None:
    """Every layer image-shaped, and the FC encoder within ``purifier.max_fc_parameters`` (a layer too small
    for the layerwise encoder is refused when the purifier is built)."""
    p = cfg.purifier
    for name, shape in zip(layers, shapes):
        if len(shape) != 3:
            raise ConfigError(
                f"layer '{name}' outputs {tuple(shape)} per example, not an image-shaped C×H×W tensor: "
                "choose convolutional layers (carso info --preset P lists them)"
            )
    features = representation_features(shapes, p.layerwise_depth)
    if features * p.fcrepr > p.max_fc_parameters:
        raise ConfigError(
            f"the representation ({len(layers)} layers, {sum(c * h * w for c, h, w in shapes):,} values) encodes to "
            f"{features:,} features: the FC encoder {features:,} × fcrepr {p.fcrepr} = {features * p.fcrepr:,} "
            f"weights exceeds purifier.max_fc_parameters = {p.max_fc_parameters:,}; choose fewer or smaller layers "
            f"(--set purifier.layers=[...]) or raise the limit (--set purifier.max_fc_parameters=N)"
        )


def purifier_spec_for(cfg: Config, classifier: nn.Module | None = None) -> PurifierSpec:
    """The purifier spec of a preset: layers resolved and sorted by execution order, their shapes probed.

    The probe runs on the meta device (no memory, no compute), so it is instant even for WRN-28-10.
    """
    probe = copy.deepcopy(classifier).to("meta") if classifier is not None else None
    if probe is None:
        with torch.device("meta"):
            probe = sources.build(cfg, check=False)
    probe.eval()
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    layers = resolve_layers(probe, cfg.purifier.layers, shape, min_side=2 * cfg.purifier.layerwise_depth)
    layers = execution_order(probe, layers, shape)
    shapes = representation_shapes(probe, layers, shape)
    check_representation(cfg, layers, shapes)
    return spec_from_config(cfg, layers, shapes)


def build_purifier(cfg: Config, classifier: nn.Module | None = None, inference_only: bool = False) -> Purifier:
    return Purifier(purifier_spec_for(cfg, classifier), inference_only=inference_only)


def save_purifier(path: str | Path, purifier: Purifier, inference_only: bool = True) -> None:
    """Atomically save the purifier; by default only what inference keeps (condition encoder, decoder)."""
    tensors = purifier.inference_state_dict() if inference_only else purifier.state_dict()
    meta = purifier.spec.to_metadata()
    meta["parts"] = "inference" if inference_only else "full"
    ckpt.save_tensors(path, tensors, meta)


def load_purifier(path: str | Path, device: str | torch.device = "cpu") -> Purifier:
    """A purifier rebuilt from its file alone (the header holds its spec), in eval mode."""
    tensors, meta = ckpt.load_tensors(path)
    spec = PurifierSpec.from_metadata(meta, source=str(path))
    purifier = Purifier(spec, inference_only=meta.get("parts", "inference") == "inference")
    ckpt.load_into(purifier, tensors, what=f"purifier weights in {path}")
    return purifier.to(device).eval()


def recorded_sha256(run: Path) -> str | None:
    """The sha256 of the weights file a run's classifier came from (``classifier.json``), if recorded."""
    import json

    ref = Path(run) / ckpt.CLASSIFIER_REF_FILE
    try:
        return json.loads(ref.read_text()).get("sha256") if ref.is_file() else None
    except ValueError:
        return None


@dataclass
class LoadedRun:
    run: Path
    cfg: Config
    classifier: nn.Module
    purifier: Purifier

    def carso(
        self, samples: int | None = None, aggregation: str | None = None, final_classifier: nn.Module | None = None
    ) -> CARSO:
        """The frozen, eval-mode CARSO model of this run."""
        model = CARSO(
            self.classifier,
            self.purifier,
            samples=self.cfg.inference.samples if samples is None else samples,
            aggregation=aggregation or self.cfg.inference.aggregation,
            final_classifier=final_classifier,
        )
        set_eval_frozen(self.classifier, self.purifier, final_classifier)
        return model


def load_run(run: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedRun:
    """Config, classifier and purifier of a run directory (default: the latest under ./runs)."""
    run_dir = ckpt.resolve_run(run)
    cfg = load_config(run_dir / ckpt.CONFIG_FILE)
    classifier = sources.load_saved(ckpt.classifier_path_of(run_dir), cfg, device)
    purifier = load_purifier(run_dir / ckpt.PURIFIER_FILE, device)
    if purifier.spec.num_classes != cfg.data.num_classes:
        raise CheckpointError(f"{run_dir}: purifier and config disagree on the number of classes")
    return LoadedRun(run_dir, cfg, classifier, purifier)


def write_run(
    run_dir: str | Path,
    cfg: Config,
    classifier: nn.Module | str | Path,
    purifier: Purifier,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write a complete run directory: resolved config, classifier weights, purifier inference bundle.

    ``classifier`` is a module (its weights are copied into the run) or a path to a weights file
    (referenced by path and sha256, not copied). ``class_names`` (default: the dataset's, when known)
    go to ``classes.json``. Every file is written atomically.
    """
    from carso_cli.classnames import write_run_class_names
    from carso_cli.config import config_to_toml
    from carso_cli.data import dataset_class_names

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(run / ckpt.CONFIG_FILE, config_to_toml(cfg))
    if isinstance(classifier, nn.Module):
        sources.save(run / ckpt.CLASSIFIER_FILE, classifier, cfg, recorded_sha256(run))
    else:
        ckpt.write_classifier_reference(run, Path(classifier))
    save_purifier(run / ckpt.PURIFIER_FILE, purifier, inference_only=True)
    names = dataset_class_names(cfg) if class_names is None else list(class_names)
    if names is not None and len(names) == cfg.data.num_classes:
        write_run_class_names(run, names)
    return run
