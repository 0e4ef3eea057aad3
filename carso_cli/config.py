"""Preset schema, TOML loading, command-line overrides and validation.

A preset is data only: one TOML file per scenario in ``presets/``. It is read into the dataclasses
below, which are the single source of truth for every tunable number. Unknown keys and values of the
wrong type are errors naming the key and the file, so a typo is never silently ignored.

Fractions such as ``"8/255"`` are accepted wherever a float is expected (ε is usually written so).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from carso_cli.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

DATASETS = ("cifar10", "cifar100", "tinyimagenet", "synthetic")  # plus "imagefolder:PATH"
ACTIVATIONS = ("silu", "relu")
DECODERS = ("32x32", "64x64")
SCHEDULES = ("paper", "code")
ADVERSARIAL_COUNTS = ("global", "per-process")
EPS_SPACES = ("pixel", "normalised")
# Where a classifier comes from (classifier.architecture): "wideresnet" or "KIND:NAME".
SOURCE_KINDS = ("robustbench", "torchvision", "timm", "python")
NORMALIZE = ("auto", "preset", "none")


def source_problem(architecture: str) -> str | None:
    """Why ``architecture`` is not a classifier source (None when it is one): the syntax only; whether the
    name exists is checked when the model is built (``carso_cli.models.sources``)."""
    if architecture == "wideresnet":
        return None
    kind, sep, name = architecture.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        kinds = ", ".join(f"{k}:NAME" for k in SOURCE_KINDS)
        return f"must be 'wideresnet' or one of {kinds}, got {architecture!r}"
    if not name:
        return f"names no model after '{kind}:'"
    if kind == "python" and (name.count(":") != 1 or not all(name.split(":"))):
        return f"must look like python:package.module:factory, got {architecture!r}"
    return None


@dataclass
class DataConfig:
    dataset: str = "synthetic"
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    # Normalisation of the DeepMind / RobustBench WideResNets (the published weights expect them).
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2471, 0.2435, 0.2616])
    augment: bool = True  # random crop with padding + horizontal flip, training only
    crop_padding: int = 4
    num_workers: int = 4
    # Only for dataset = "synthetic": sizes of its splits and the seed that generates it.
    synthetic_train_size: int = 5000
    synthetic_test_size: int = 1000
    synthetic_seed: int = 0


@dataclass
class ClassifierConfig:
    """Where the classifier comes from (``carso_cli.models.sources``) and the WideResNet's shape."""

    # "wideresnet" (the DeepMind layout below), "robustbench:NAME", "torchvision:NAME", "timm:NAME" or
    # "python:package.module:factory" (a callable in the user's code returning an nn.Module).
    architecture: str = "wideresnet"
    depth: int = 28  # wideresnet only
    width: int = 10  # wideresnet only
    activation: str = "silu"  # wideresnet only
    # robustbench: the zoo's threat model, its dataset ("" = data.dataset) and its cache directory.
    threat_model: str = "Linf"
    robustbench_dataset: str = ""
    robustbench_dir: str = "models"
    # The preset's data.mean/std applied inside the model: "auto" (where the source has no normalisation
    # of its own: torchvision, timm, python), "preset" or "none".
    normalize: str = "auto"
    # torchvision/timm ImageNet stems on small images: the first strided or large convolution becomes a
    # 3×3 stride-1 one and the first max-pool goes (the usual CIFAR adaptation of a ResNet).
    small_stem: bool = False


@dataclass
class PurifierConfig:
    # Representation layers (Table 7): "auto" (the paper's rule for any residual network), a list of
    # module names and glob patterns ("layer1.*.conv1"), or a rule, e.g. "rule:block-convs".
    layers: str | list[str] = "rule:block-convs"
    layerwise_depth: int = 3  # Tables 8/9: 3 convolutions for 32×32, 4 for 64×64
    fcrepr: int = 512  # Table 15
    fjoint: int = 128  # Table 15
    decoder: str = "32x32"  # Table 12 ("32x32") or Table 13 ("64x64")
    input_encoder_channels: list[int] = field(default_factory=lambda: [6, 12])  # Table 6
    decoder_channels: list[int] = field(default_factory=lambda: [256, 256, 128, 64, 32])  # Tables 12/13
    leaky_slope: float = 0.2
    # Refuse a representation whose FC encoder (Table 10) would hold more weights than this: its input
    # is the flattened output of the layerwise encoders, which grows with the layers' sizes.
    max_fc_parameters: int = 1_000_000_000


@dataclass
class TrainingConfig:
    """Purifier training (Table 16). Epochs are counted from 0."""

    epochs: int = 200
    warmup_epochs: int = 25
    plateau_epochs: int = 25
    annealing_epochs: int = 150
    initial_lr: float = 5e-9
    plateau_lr: float = 0.064
    final_lr: float = 4.346e-4
    beta_start_epoch: int = 25
    beta_end_epoch: int = 34
    batch_size: int = 5120  # global batch, split across ranks
    adversarial_fraction: float = 0.5
    lookahead_k: int = 6
    lookahead_alpha: float = 0.8
    radam_beta1: float = 0.9
    radam_beta2: float = 0.999
    radam_eps: float = 1e-8
    weight_decay: float = 0.0
    bf16: bool = True  # autocast on CUDA only; CPU always runs float32
    checkpoint_every: int = 1
    # The recipe's switches (docs/FIDELITY.md): the paper's text (defaults) or the authors' code.
    schedule: str = "paper"  # "paper": lr_at_epoch's pieces; "code": ebtorch warmed_up_linneal (SequentialLR)
    drop_last: bool = True  # drop the last partial batch of an epoch (the code's DataLoader keeps it)
    adversarial_count: str = "global"  # "global": fraction of the global batch (Table 16); "per-process": code
    # Processes the per-process quantities refer to (adversarial counts, LRs per example): the published
    # runs' world size for the code recipe, so it reproduces them on any number of GPUs.
    reference_world_size: int = 1
    # When > 0: plateau_lr / final_lr = value × per-process batch (batch_size // reference_world_size), as
    # the code computes them (BASE_LR_MULT = 1e-4, FINAL_LR_MULT = 1.25e-8).
    plateau_lr_per_example: float = 0.0
    final_lr_per_example: float = 0.0
    # The loss whose gradient is taken: "mean" over the global batch of the per-example sums (section 5.1's
    # summed BCE + β·KL, per example), or "sum" over the global batch (the code: loss × world_size under DDP).
    loss_reduction: str = "mean"
    # Memory bounds (carso_cli/memory.py), 0 = the whole per-process batch, or "auto" (from free GPU
    # memory). attack_chunk: examples attacked at once (exact: the attacks are per-example).
    # micro_batch: examples per purifier forward/backward, gradients accumulated; BatchNorm then
    # normalises over micro-batches ("ghost" batch norm), not the global batch of section 4.4.
    attack_chunk: int | str = 0
    micro_batch: int | str = 0
    # torch.compile backend for the attacked classifier and the purifier's training pass ("off": eager;
    # "inductor": the default compiler). Not bitwise the eager run; a failing compile falls back to eager.
    compile: str = "off"


@dataclass
class AttackConfig:
    """Attack settings (Table 14 and section 5.1)."""

    eps: float = 8 / 255
    # Adversarially-balanced batches (section 4.4): FGSM and PGD at ε/2 and ε (in train_eps_space).
    fgsm_eps: list[float] = field(default_factory=lambda: [4 / 255, 8 / 255])
    pgd_eps: list[float] = field(default_factory=lambda: [4 / 255, 8 / 255])
    # The space fgsm_eps / pgd_eps are given in: "pixel" ([0, 1] images, the paper), or "normalised" (the
    # code's _epsscaler: pixel ε = ε · C / Σ data.std, since the attacked classifier normalises inside).
    train_eps_space: str = "pixel"
    pgd_steps: int = 40
    pgd_step_size: float = 0.01
    pgd_random_start: bool = True
    pgd_eot_steps: int = 200
    pgd_eot_step_size: float = 0.007
    pgd_eot_iterations: int = 20
    randaa_eot_iterations: int = 20
    sanity_eps: float = 0.95  # Table 3


@dataclass
class InferenceConfig:
    samples: int = 8  # reconstructions per input (Table 16)
    aggregation: str = "dexp"  # section 4.5


@dataclass
class ClassifierTrainingConfig:
    """`train-classifier`: Madry-style PGD adversarial training (not part of the paper's tables)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    adversarial: str = "pgd"  # "pgd" or "none"
    pgd_steps: int = 10
    pgd_step_size: float = 2 / 255
    # Memory bounds, as training.attack_chunk / micro_batch (0 = the whole per-process batch, or "auto").
    # The model is attacked in train mode (Madry et al.), so both change BatchNorm's batch statistics
    # ("ghost" batch norm): unlike the purifier's attacks, chunked PGD here is not the unchunked one.
    attack_chunk: int | str = 0
    micro_batch: int | str = 0


@dataclass
class Config:
    name: str = "custom"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    purifier: PurifierConfig = field(default_factory=PurifierConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    attacks: AttackConfig = field(default_factory=AttackConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    classifier_training: ClassifierTrainingConfig = field(default_factory=ClassifierTrainingConfig)


# --------------------------------------------------------------------------------------------------
# Value parsing
# --------------------------------------------------------------------------------------------------


def parse_fraction(value: Any, what: str = "value") -> float:
    """A float from a number or a string such as ``"8/255"`` or ``"0.03"``.

    Raises:
        ConfigError: for anything else (booleans included).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a number or a fraction like '8/255', got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{what}: expected a number or a fraction like '8/255', got {value!r}")


def parse_eps(value: Any, what: str = "eps") -> float:
    """ε as ``"8/255"`` or a float in [0, 1]."""
    eps = parse_fraction(value, what)
    if not 0.0 <= eps <= 1.0:
        raise ConfigError(f"{what}: must lie in [0, 1] (pixel scale), got {value!r}")
    return eps


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check (and lightly convert) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key, source)
            except ConfigError as err:
                errors.append(str(err))
        names = " or ".join(_type_name(a) for a in typing.get_args(tp))
        raise ConfigError(f"{source}: '{key}' must be {names}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        try:
            return parse_fraction(value, f"{source}: '{key}'")
        except ConfigError:
            raise ConfigError(
                f"{source}: '{key}' must be a number (or a fraction like '8/255'), got {value!r}"
            ) from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp!r} for {key}")  # a bug in the schema, not user error


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.')}' must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}", source)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------------------


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def resolve_preset_path(name_or_path: str | Path) -> Path:
    """A preset name (``cifar10``) or a path to a TOML file."""
    text = str(name_or_path)
    path = Path(text)
    if path.suffix == ".toml" or path.exists() or "/" in text:
        if not path.is_file():
            raise ConfigError(f"preset file not found: {path}")
        return path
    candidate = PRESETS_DIR / f"{text}.toml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown preset '{text}' (available: {', '.join(list_presets())}; or give a path to a .toml file)"
        )
    return candidate


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None


def _merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``parent``: tables merge key by key, any other value replaces the parent's."""
    out = dict(parent)
    for key, value in child.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset_data(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's TOML with its ``extends = "parent"`` chain resolved (the child holds only what it changes).

    The parent is a preset name, or a path relative to the child's folder. Cycles and missing parents are
    errors naming the chain.
    """
    path = path.resolve()
    if path in _chain:
        names = " → ".join(p.stem for p in (*_chain, path))
        raise ConfigError(f"{path}: preset inheritance cycle ({names})")
    data = _read_toml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a preset name, got {parent!r}")
    relative = path.parent / parent
    try:
        parent_path = relative if relative.suffix == ".toml" and relative.is_file() else resolve_preset_path(parent)
    except ConfigError:
        raise ConfigError(
            f"{path}: extends '{parent}', which is no preset (available: {', '.join(list_presets())})"
        ) from None
    return _merge(preset_data(parent_path, (*_chain, path)), data)


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a preset (by name or path, ``extends`` resolved), apply ``overrides`` (dotted keys), validate."""
    path = resolve_preset_path(name_or_path)
    data = preset_data(path)
    cfg = _build(Config, data, "", str(path))
    validate(cfg, str(path))  # first alone: a problem of the preset is reported against its file
    if overrides:
        apply_overrides(cfg, overrides)  # (validated again, as "command line")
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.epochs=3"`` → ``("training.epochs", 3)``; the value is read as TOML, else a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: dict[str, Any], source: str = "command line") -> Config:
    """Set dotted keys (``training.epochs``) in place, with the same checks as the preset file."""
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.split(".")
        obj: Any = cfg
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                raise ConfigError(f"{source}: unknown key '{key}'")
            obj = getattr(obj, part)
        leaf = parts[-1]
        if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(f"{source}: unknown key '{key}'")
        tp = typing.get_type_hints(type(obj))[leaf]
        if dataclasses.is_dataclass(tp):
            raise ConfigError(f"{source}: '{key}' is a section, not a value")
        setattr(obj, leaf, _coerce(value, tp, key, source))
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str) -> None:
    """Check every key (``config_checks``: the bounds of each number, the choices of each string, the
    relations between keys), so that a typo is reported against its key rather than as a crash later.

    Raises:
        ConfigError: ``SOURCE: 'KEY' why``.
    """
    from carso_cli.config_checks import check  # (it reads this module's schema)

    check(cfg, source)


def eps_scale(cfg: Config) -> float:
    """Pixel ε per unit of the training attacks' ``fgsm_eps``/``pgd_eps``: 1 in pixel space; C / Σ std in
    the classifier's normalised space (the authors' ``tooling/attacks.py`` ``_epsscaler``)."""
    if cfg.attacks.train_eps_space == "pixel":
        return 1.0
    return len(cfg.data.std) / sum(cfg.data.std)


def per_process_batch(t: TrainingConfig) -> int:
    """The batch of one of the ``reference_world_size`` processes (the code's ``max(batch // world, 2)``)."""
    return max(t.batch_size // t.reference_world_size, 2)


def resolved_lrs(t: TrainingConfig) -> tuple[float, float]:
    """(plateau LR, final LR): the preset's values, or per-example values × the per-process batch."""
    b = per_process_batch(t)
    plateau = t.plateau_lr_per_example * b if t.plateau_lr_per_example > 0 else t.plateau_lr
    final = t.final_lr_per_example * b if t.final_lr_per_example > 0 else t.final_lr
    return plateau, final


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML (what a run directory keeps); loads back to an equal Config."""
    data = config_to_dict(cfg)
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"
