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
from carso_cli.errors import CheckpointError
from carso_cli.models.carso import CARSO, set_eval_frozen
from carso_cli.models.purifier import Purifier, PurifierSpec, spec_from_config
from carso_cli.models.representation import execution_order, representation_shapes, resolve_layers
from carso_cli.models.wideresnet import WideResNet, build_classifier

__all__ = [
    "CARSO",
    "Purifier",
    "PurifierSpec",
    "WideResNet",
    "build_classifier",
    "load_classifier",
    "purifier_spec_for",
    "build_purifier",
    "save_purifier",
    "load_purifier",
    "LoadedRun",
    "load_run",
    "write_run",
    "set_eval_frozen",
]


def load_classifier(cfg: Config, path: str | Path, device: str | torch.device = "cpu") -> WideResNet:
    """The preset's classifier with weights from ``path`` (safetensors or .pt/.pth), in eval mode."""
    model = build_classifier(cfg)
    ckpt.load_into(model, ckpt.load_state_dict_file(path), what=f"classifier weights in {path}")
    return model.to(device).eval()


def purifier_spec_for(cfg: Config, classifier: nn.Module | None = None) -> PurifierSpec:
    """The purifier spec of a preset: layers resolved and sorted by execution order, their shapes probed.

    The probe runs on the meta device (no memory, no compute), so it is instant even for WRN-28-10.
    """
    probe = copy.deepcopy(classifier).to("meta") if classifier is not None else None
    if probe is None:
        with torch.device("meta"):
            probe = build_classifier(cfg)
    probe.eval()
    layers = resolve_layers(probe, cfg.purifier.layers)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    layers = execution_order(probe, layers, shape)
    shapes = representation_shapes(probe, layers, shape)
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


@dataclass
class LoadedRun:
    run: Path
    cfg: Config
    classifier: WideResNet
    purifier: Purifier

    def carso(self, samples: int | None = None, aggregation: str | None = None,
              final_classifier: nn.Module | None = None) -> CARSO:
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
    classifier = load_classifier(cfg, ckpt.classifier_path_of(run_dir), device)
    purifier = load_purifier(run_dir / ckpt.PURIFIER_FILE, device)
    if purifier.spec.num_classes != cfg.data.num_classes:
        raise CheckpointError(f"{run_dir}: purifier and config disagree on the number of classes")
    return LoadedRun(run_dir, cfg, classifier, purifier)


def write_run(run_dir: str | Path, cfg: Config, classifier: nn.Module | str | Path, purifier: Purifier,
              class_names: Sequence[str] | None = None) -> Path:
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
        ckpt.save_tensors(run / ckpt.CLASSIFIER_FILE, classifier.state_dict(), {"format": "carso-classifier"})
    else:
        ckpt.write_classifier_reference(run, Path(classifier))
    save_purifier(run / ckpt.PURIFIER_FILE, purifier, inference_only=True)
    names = dataset_class_names(cfg) if class_names is None else list(class_names)
    if names is not None and len(names) == cfg.data.num_classes:
        write_run_class_names(run, names)
    return run
