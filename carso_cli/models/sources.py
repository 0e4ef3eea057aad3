"""Where a classifier comes from: the preset's WideResNet, RobustBench's zoo, torchvision, timm, the user's code.

``classifier.architecture`` (a preset key, or ``--classifier SOURCE``) names the source:

- ``wideresnet``: the DeepMind-layout WideResNet of ``wideresnet.py`` (depth/width/activation), weights
  from a file (``--classifier FILE``);
- ``robustbench:NAME``: the architecture from the ``robustbench`` package's model zoo (dataset and threat
  model from the preset), weights through RobustBench's own loader and cache directory
  (``classifier.robustbench_dir``, laid out as ``DIR/DATASET/THREAT_MODEL/NAME.pt``);
- ``torchvision:NAME`` / ``timm:NAME``: the architecture with ``num_classes`` set, weights from a file
  (``--classifier-weights FILE``: safetensors, or ``.pt`` read with ``weights_only=True``);
- ``python:package.module:factory``: a callable in the user's code returning an ``nn.Module`` (called
  with ``num_classes=`` when it takes it); the module is imported only when a preset or option names it,
  from the current directory first (as ``python -m`` does), then ``PYTHONPATH`` and the installed packages.

Every classifier takes [0, 1] images. A source without normalisation of its own (torchvision, timm,
python) gets the preset's mean/std, applied by a forward pre-hook on the model itself so that module
names — the representation layers — stay the source's own.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli.config import (
    SOURCE_KINDS,
    ClassifierConfig,
    Config,
    DataConfig,
    source_problem,
)
from carso_cli.errors import CheckpointError, ConfigError

FORMAT = "carso-classifier"
FORMAT_VERSION = 1
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")
# Optional packages: the install line a missing one asks for.
EXTRAS = {"robustbench": 'pip install "carso[robustbench]"', "timm": 'pip install "carso[timm]"'}


@dataclass(frozen=True)
class Source:
    kind: str  # "wideresnet", "robustbench", "torchvision", "timm" or "python"
    name: str  # "" for wideresnet

    @property
    def text(self) -> str:
        return self.kind if self.kind == "wideresnet" else f"{self.kind}:{self.name}"


def parse(architecture: str) -> Source:
    """``"torchvision:resnet18"`` → Source("torchvision", "resnet18"); a malformed string is a ConfigError."""
    why = source_problem(architecture)
    if why:
        raise ConfigError(f"classifier source {why}")
    if architecture == "wideresnet":
        return Source("wideresnet", "")
    kind, _, name = architecture.partition(":")
    return Source(kind, name)


def is_source(value: str | Path | None) -> bool:
    """Whether a ``--classifier`` value names a source (``KIND:NAME``) rather than a weights file."""
    text = str(value or "")
    return text.partition(":")[0] in SOURCE_KINDS and not Path(text).exists()


def option_sets(
    sets: list[str] | None, classifier: str | Path | None, weights: Path | None
) -> tuple[list[str] | None, str | Path | None]:
    """``--classifier`` / ``--classifier-weights`` as (``--set`` overrides, the weights' path or name).

    ``--classifier SOURCE`` sets ``classifier.architecture`` (so the run records it, and a relaunch or a
    resume carries it); the weights then come from ``--classifier-weights`` (or the source's loader).
    ``--classifier FILE`` stays the weights of the preset's architecture.
    """
    if classifier is not None and is_source(classifier):
        why = source_problem(str(classifier))
        if why:
            raise ConfigError(f"--classifier: {why}")
        return [*(sets or []), f'classifier.architecture="{classifier}"'], weights
    if classifier is not None and weights is not None:
        raise ConfigError("--classifier FILE and --classifier-weights FILE both give weights: pass one")
    return sets, classifier if classifier is not None else weights


# --------------------------------------------------------------------------------------------------
# Building an architecture
# --------------------------------------------------------------------------------------------------


def _nearest(name: str, names: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
    return f"unknown {what} '{name}'" + (f" (nearest: {', '.join(close)})" if close else "")


def _optional(package: str, source: str) -> types.ModuleType:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{source} needs the {package} package: {EXTRAS.get(package, f'pip install {package}')}")
    return importlib.import_module(package)


def robustbench_modules() -> tuple[Any, Any, Any]:
    """(robustbench.utils, model_dicts, enums) of the installed robustbench.

    robustbench 1.1.1's package ``__init__`` imports ``autoattack`` (which its PyPI dependency
    ``pyautoattack`` does not provide) and ``pkg_resources`` (gone from setuptools ≥ 81), for its data
    and evaluation helpers only. carso needs the model zoo and the loader, so when the package is not
    imported yet it is registered without running its ``__init__`` and only those submodules are imported.
    """
    spec = importlib.util.find_spec("robustbench")
    if spec is None:
        raise ConfigError(f"robustbench:NAME needs the robustbench package: {EXTRAS['robustbench']}")
    if "robustbench" not in sys.modules:
        package = types.ModuleType("robustbench")
        package.__path__ = list(spec.submodule_search_locations or [])
        package.__spec__ = spec
        sys.modules["robustbench"] = package
    try:
        utils = importlib.import_module("robustbench.utils")
        zoo = importlib.import_module("robustbench.model_zoo.models")
        enums = importlib.import_module("robustbench.model_zoo.enums")
    except ImportError as err:
        raise ConfigError(f"robustbench is installed but cannot be imported ({err}): {EXTRAS['robustbench']}") from None
    return utils, zoo.model_dicts, enums


def robustbench_entry(cfg: Config, name: str) -> tuple[str, str, dict[str, Any]]:
    """(dataset, threat model, the zoo's entry) of ``robustbench:NAME`` for the preset."""
    _, model_dicts, enums = robustbench_modules()
    dataset = cfg.classifier.robustbench_dataset or cfg.data.dataset
    if dataset not in ROBUSTBENCH_DATASETS:
        raise ConfigError(
            f"robustbench:{name}: RobustBench has no dataset '{dataset}' "
            f"(set classifier.robustbench_dataset to one of {', '.join(ROBUSTBENCH_DATASETS)})"
        )
    threats = {t.value: t for t in model_dicts[enums.BenchmarkDataset(dataset)]}
    threat = cfg.classifier.threat_model
    if threat not in threats:
        raise ConfigError(
            _nearest(threat, list(threats), f"RobustBench threat model for {dataset}") + " (classifier.threat_model)"
        )
    models = model_dicts[enums.BenchmarkDataset(dataset)][threats[threat]]
    if name not in models:
        raise ConfigError(_nearest(name, list(models), f"RobustBench model ({dataset}, {threat})"))
    return dataset, threat, models[name]


def _torchvision(name: str, num_classes: int) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise ConfigError(_nearest(name, names, "torchvision model"))
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _timm(name: str, num_classes: int, channels: int) -> nn.Module:
    timm = _optional("timm", f"timm:{name}")
    names = timm.list_models()
    if name not in names:
        raise ConfigError(_nearest(name, names, "timm model"))
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels)


def _with_current_directory() -> None:
    """Put the current directory first on ``sys.path`` unless it is there: ``python -m carso_cli`` (and its
    torchrun workers) find a user's module there, and so must the ``carso`` console script, whose
    ``sys.path[0]`` is its bin directory."""
    here = os.path.realpath(os.getcwd())
    if all(os.path.realpath(entry or os.curdir) != here for entry in sys.path):
        sys.path.insert(0, here)


def _python(target: str, num_classes: int) -> nn.Module:
    module_name, _, attr = target.partition(":")
    _with_current_directory()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"python:{target}: cannot import {module_name} ({err}; run carso from the folder that holds it, "
            "or put that folder on PYTHONPATH)"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise ConfigError(f"python:{target}: " + _nearest(attr, names, f"callable in {module_name}"))
    try:
        takes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes = False
    model = factory(num_classes=num_classes) if takes else factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"python:{target} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _architecture(cfg: Config, source: Source) -> nn.Module:
    """The source's architecture, randomly initialised (no weights are read)."""
    from carso_cli.models.wideresnet import build_classifier as build_wideresnet

    d = cfg.data
    if source.kind == "wideresnet":
        return build_wideresnet(cfg)
    if source.kind == "torchvision":
        return _torchvision(source.name, d.num_classes)
    if source.kind == "timm":
        return _timm(source.name, d.num_classes, d.channels)
    if source.kind == "python":
        return _python(source.name, d.num_classes)
    return robustbench_entry(cfg, source.name)[2]["model"]()


def own_normalisation(source: Source) -> bool:
    """Whether the source's models normalise their [0, 1] inputs themselves (RobustBench's contract; the
    WideResNet does so with the preset's mean/std)."""
    return source.kind in ("wideresnet", "robustbench")


def added_normalisation(cfg: Config) -> tuple[list[float], list[float]] | None:
    """(mean, std) that carso applies inside the classifier, or None (the model's own, or none)."""
    mode = cfg.classifier.normalize
    source = parse(cfg.classifier.architecture)
    if source.kind == "wideresnet" or mode == "none" or (mode == "auto" and own_normalisation(source)):
        return None
    return list(cfg.data.mean), list(cfg.data.std)


def _normalise_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: x in [0, 1] → (x − mean) / std with the preset's statistics."""
    return ((args[0] - module.carso_mean) / module.carso_std, *args[1:])


def add_normalisation(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Normalise inputs inside ``model`` (non-persistent buffers: the weights files do not hold them)."""
    model.register_buffer(
        "carso_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False
    )
    model.register_buffer("carso_std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    model.register_forward_pre_hook(_normalise_input)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def adapt_small_stem(model: nn.Module) -> nn.Module:
    """An ImageNet stem for small images: the first convolution, when strided or larger than 3×3, becomes
    3×3 stride 1 (same channels), and the first max-pool is removed — the usual CIFAR ResNet."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs:
        name, conv = convs[0]
        if conv.stride != (1, 1) or max(conv.kernel_size) > 3:
            _replace(model, name, nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None))
    pools = [n for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)]
    if pools:
        _replace(model, pools[0], nn.Identity())
    return model


def check_output(model: nn.Module, cfg: Config, what: str) -> None:
    """A classifier must map (N, C, H, W) to (N, classes): probed with 2 images (meta device when it can)."""
    d = cfg.data
    shape = (2, d.channels, d.image_size, d.image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                out = copy.deepcopy(model).to("meta")(torch.zeros(shape, device="meta"))
            except (NotImplementedError, RuntimeError):  # an op without a meta kernel: a real forward
                device = next((p.device for p in model.parameters()), torch.device("cpu"))
                out = model(torch.zeros(shape, device=device))
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, d.num_classes):
        raise ConfigError(
            f"{what} gives {got} for a batch of 2 {d.channels}×{d.image_size}×{d.image_size} "
            f"images, not (2, {d.num_classes}) = (N, data.num_classes)"
        )


def build(cfg: Config, check: bool = True) -> nn.Module:
    """The preset's classifier, randomly initialised, [0, 1] inputs (normalisation inside), checked."""
    source = parse(cfg.classifier.architecture)
    model = _architecture(cfg, source)
    if cfg.classifier.small_stem:
        adapt_small_stem(model)
    stats = added_normalisation(cfg)
    if stats is not None:
        add_normalisation(model, *stats)
    if check:
        check_output(model, cfg, source.text)
    return model


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


@dataclass
class LoadedClassifier:
    model: nn.Module  # eval mode, on the device
    weights: Path | None  # the file the weights came from (its sha256 is recorded), if one
    source: str


def needs_weights_file(cfg: Config) -> bool:
    """Whether the source needs a weights file from the user (RobustBench's loader and a python factory
    bring their own)."""
    return parse(cfg.classifier.architecture).kind in ("wideresnet", "torchvision", "timm")


def robustbench_file(cfg: Config, name: str) -> Path:
    """Where RobustBench's loader keeps ``NAME`` (its cache layout: DIR/DATASET/THREAT_MODEL/NAME.pt)."""
    dataset, threat, _ = robustbench_entry(cfg, name)
    return Path(cfg.classifier.robustbench_dir) / dataset / threat / f"{name}.pt"


def _robustbench_load(cfg: Config, name: str) -> tuple[nn.Module, Path | None]:
    utils, _, _ = robustbench_modules()
    dataset, threat, _ = robustbench_entry(cfg, name)
    try:
        # torch ≥ 2.6 loads with weights_only=True by default, which RobustBench's loader relies on.
        model = utils.load_model(name, model_dir=cfg.classifier.robustbench_dir, dataset=dataset, threat_model=threat)
    except Exception as err:  # noqa: BLE001 - its download (gdown), torch.load, load_state_dict: many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"robustbench:{name}: RobustBench's loader failed ({first}); its cache: {robustbench_file(cfg, name)}"
        ) from None
    file = robustbench_file(cfg, name)
    return model, file if file.is_file() else None


def load(cfg: Config, weights: str | Path | None, device: str | torch.device = "cpu") -> LoadedClassifier:
    """The preset's classifier with its weights, in eval mode on ``device``.

    ``weights``: a safetensors / .pt file (strict loading, the first mismatching keys named). Without it,
    ``robustbench:NAME`` loads through RobustBench (its cache, downloading if needed) and a ``python:``
    factory keeps the weights it returned; the other sources need a file.
    """
    source = parse(cfg.classifier.architecture)
    if weights is None and source.kind == "robustbench":
        model, file = _robustbench_load(cfg, source.name)
        if cfg.classifier.small_stem:
            raise ConfigError(
                "classifier.small_stem does not apply to RobustBench models (their weights fit their stem)"
            )
        stats = added_normalisation(cfg)
        if stats is not None:
            add_normalisation(model, *stats)
        check_output(model, cfg, source.text)
        return LoadedClassifier(model.to(device).eval(), file, source.text)
    if weights is None and needs_weights_file(cfg):
        option = "--classifier FILE" if source.kind == "wideresnet" else "--classifier-weights FILE"
        raise ConfigError(f"{source.text} needs weights: {option} (safetensors or .pt)")
    model = build(cfg)
    if weights is not None:
        ckpt.load_into(model, ckpt.load_state_dict_file(weights), what=f"{source.text} weights in {weights}")
    return LoadedClassifier(model.to(device).eval(), Path(weights) if weights is not None else None, source.text)


# --------------------------------------------------------------------------------------------------
# What a run keeps: the classifier's header, and the record of where its weights came from
# --------------------------------------------------------------------------------------------------

_DATA_KEYS = ("dataset", "image_size", "channels", "num_classes", "mean", "std")


def metadata(cfg: Config, weights_sha256: str | None = None) -> dict[str, str]:
    """The safetensors header of a run's classifier copy: everything that rebuilds it without the preset."""
    data = {k: getattr(cfg.data, k) for k in _DATA_KEYS}
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "classifier": json.dumps(dataclasses.asdict(cfg.classifier)),
        "data": json.dumps(data),
        "weights_sha256": weights_sha256 or "",
    }


def config_from_metadata(meta: dict[str, str], source: str) -> Config | None:
    """The classifier part of a Config from a header written by ``metadata`` (None for an older file)."""
    if "classifier" not in meta:
        return None
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise CheckpointError(
            f"{source} has classifier format {meta['format_version']}; this carso reads up to "
            f"{FORMAT_VERSION}: upgrade carso"
        )
    try:
        return Config(
            classifier=ClassifierConfig(**json.loads(meta["classifier"])), data=DataConfig(**json.loads(meta["data"]))
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: damaged classifier header ({err})") from None


def save(path: str | Path, model: nn.Module, cfg: Config, weights_sha256: str | None = None) -> None:
    """Atomically write the classifier's weights with the header that rebuilds it."""
    ckpt.save_tensors(path, model.state_dict(), metadata(cfg, weights_sha256))


def load_saved(path: str | Path, cfg: Config, device: str | torch.device = "cpu") -> nn.Module:
    """A run's classifier: rebuilt from its file's header when it has one (else from ``cfg``), weights strict."""
    meta = ckpt.read_metadata(path) if Path(path).suffix == ".safetensors" else {}
    built = config_from_metadata(meta, str(path))
    # carso's own copy is loaded as written (a RobustBench ImageNet model's keys all start with "model.",
    # which a foreign file's loader would strip); a foreign file as any weights file is.
    tensors = ckpt.load_tensors(path)[0] if built is not None else ckpt.load_state_dict_file(path)
    built = built or cfg
    model = build(built, check=False)
    ckpt.load_into(model, tensors, what=f"{parse(built.classifier.architecture).text} weights in {path}")
    return model.to(device).eval()


def record(run: Path, loaded: LoadedClassifier) -> dict[str, Any]:
    """``RUN/classifier.json``: the source, and the weights file with its sha256 (``--resume`` compares it)."""
    info: dict[str, Any] = {"source": loaded.source}
    if loaded.weights is not None:
        info.update(path=str(loaded.weights.resolve()), sha256=ckpt.sha256_file(loaded.weights))
    ckpt.atomic_write_json(run / ckpt.CLASSIFIER_REF_FILE, info)
    return info


def describe(cfg: Config) -> str:
    """One line for ``carso info``: the source and the normalisation its inputs get."""
    source = parse(cfg.classifier.architecture)
    c = cfg.classifier
    name = f"WideResNet-{c.depth}-{c.width} ({c.activation})" if source.kind == "wideresnet" else source.text
    stats = added_normalisation(cfg)
    if source.kind == "wideresnet":
        norm = f"the preset's mean {cfg.data.mean} / std {cfg.data.std}, inside the model"
    elif stats is not None:
        norm = f"the preset's mean {stats[0]} / std {stats[1]}, added by carso (the source has none of its own)"
    elif own_normalisation(source) and c.normalize == "auto":
        norm = "the model's own (RobustBench models take [0, 1] images)"
    else:
        norm = "none (classifier.normalize = 'none')"
    stem = ", small-image stem" if c.small_stem else ""
    return f"classifier {name}{stem}; inputs in [0, 1], normalisation: {norm}"
