"""The authors' published CARSO weights → a run directory (what ``carso convert`` and ``carso pull`` run).

The authors release each trained model as four safetensors files, written by
``safetensors.torch.save_model`` of these modules of their ``CARSOWrap``:

- ``repr_compressors``: ``nn.ModuleList`` of one ``nn.Sequential`` per representation layer, whose
  elements are ``nn.Sequential(Conv2d, BatchNorm2d, LeakyReLU)`` (Tables 8/9; for 32×32 inputs a
  fourth element is an ``nn.Identity`` without keys) — keys ``{layer}.{conv}.{0,1}.*``;
- ``repr_fcn_compressor``: ``nn.Sequential(concatenate-flatten, nn.Sequential(Linear, BatchNorm1d,
  LeakyReLU))`` (Table 10) — keys ``1.{0,1}.*``;
- ``decoder``: ``nn.Sequential(nn.Sequential(concatenate-flatten, Linear, LeakyReLU, Unflatten),
  4 × nn.Sequential(ConvTranspose2d, BatchNorm2d, LeakyReLU), ConvTranspose2d, Sigmoid)``
  (Tables 12/13) — keys ``0.1.*``, ``{1..4}.{0,1}.*``, ``5.*``;
- the classifier: a DeepMind-layout WideResNet state dict.

Our ``Purifier`` mirrors that layout, so the conversion is a renaming of keys (``RENAMES`` below),
checked strictly: a file in the wrong role, or whose shapes do not fit the preset, is a clear error.
The input and joint encoders are not published (inference is decoder-only, section 4.1), so the run
holds the inference bundle only — exactly what ``carso eval`` / ``predict`` / ``sanity`` need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from carso_cli import checkpoint as ckpt
from carso_cli.config import Config
from carso_cli.display import count_parameters
from carso_cli.errors import CheckpointError
from carso_cli.models import Purifier, WideResNet, build_classifier, build_purifier, write_run

PROVENANCE_FILE = "converted_from.json"


class ConversionKind(str, Enum):
    """What ``carso convert`` imports (one kind so far)."""

    reference = "reference"  # the authors' published files (their CARSOWrap submodules)


# ----------------------------------------------------------------------------------------------
# Roles: which file is which
# ----------------------------------------------------------------------------------------------

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# num_batches_tracked does not change an eval-mode forward; files saved without it are accepted.
_OPTIONAL_SUFFIX = ".num_batches_tracked"


def _block_keys(prefix: str) -> set[str]:
    """Keys of an ``nn.Sequential(Conv/Linear without bias, BatchNorm, LeakyReLU)`` under ``prefix``."""
    return {f"{prefix}0.weight"} | {f"{prefix}1.{k}" for k in _BN_KEYS}


_LAYERWISE_KEY = re.compile(r"^(\d+)\.(\d+)\.([01])\.(" + "|".join(_BN_KEYS) + r")$")
_FCN_KEYS = _block_keys("1.")
_DECODER_KEYS = {"0.1.weight", "0.1.bias", "5.weight", "5.bias"}.union(*(_block_keys(f"{k}.") for k in range(1, 5)))
_CLASSIFIER_KEYS = {"init_conv.weight", "logits.weight"}

ROLE_EXAMPLES = {
    "repr_compressors": "'0.0.0.weight', '0.0.1.running_mean', … ('{layer}.{conv}.{0,1}.*')",
    "repr_fcn_compressor": "'1.0.weight', '1.1.running_var'",
    "decoder": "'0.1.weight', '1.0.weight', '4.1.bias', '5.weight'",
    "classifier": "'init_conv.weight', 'layer.0.block.0.conv_0.weight', 'logits.weight'",
}
ROLE_OPTIONS = {
    "repr_compressors": "--repr-compressors",
    "repr_fcn_compressor": "--repr-fcn-compressor",
    "decoder": "--decoder",
    "classifier": "--classifier",
}


def _required(keys: set[str]) -> set[str]:
    return {k for k in keys if not k.endswith(_OPTIONAL_SUFFIX)}


def _has_keys(keys: set[str], expected: set[str]) -> bool:
    return _required(expected) <= keys <= expected


def _is_repr_compressors(keys: set[str]) -> bool:
    matches = [_LAYERWISE_KEY.match(k) for k in keys]
    if not keys or not all(matches):
        return False
    # the convolution (element 0) holds only a weight: the authors' convolutions have no bias
    return all(m.group(3) == "1" or m.group(4) == "weight" for m in matches if m)


def detect_role(keys: set[str]) -> str | None:
    """Which published file a state dict's keys look like ("decoder", …), or None."""
    if _is_repr_compressors(keys):
        return "repr_compressors"
    if _has_keys(keys, _FCN_KEYS):
        return "repr_fcn_compressor"
    if _has_keys(keys, _DECODER_KEYS):
        return "decoder"
    if _CLASSIFIER_KEYS <= keys:
        return "classifier"
    return None


def check_role(path: Path, role: str, state: dict[str, torch.Tensor]) -> None:
    """A clear error when the file given for ``role`` holds something else."""
    found = detect_role(set(state))
    if found == role:
        return
    if found is not None:
        hint = f"it looks like the {found} file — was it meant for {ROLE_OPTIONS[found]}?"
    else:
        some = ", ".join(f"'{k}'" for k in sorted(state)[:3]) or "none"
        hint = f"its keys are {some}{' …' if len(state) > 3 else ''}"
    raise CheckpointError(f"{path} does not look like {role} (expected keys like {ROLE_EXAMPLES[role]}); {hint}")


def _read(path: Path, role: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{ROLE_OPTIONS[role]}: file not found: {path}")
    state = ckpt.load_state_dict_file(path)
    check_role(path, role, state)
    return state


# ----------------------------------------------------------------------------------------------
# Renaming: the authors' keys → our Purifier's keys
# ----------------------------------------------------------------------------------------------


def rename_repr_compressors(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{layer}.{conv}.{0,1}.*`` → ``condition_encoder.layerwise.{layer}.{conv}.{0,1}.*`` (old → new)."""
    return {k: f"condition_encoder.layerwise.{k}" for k in state}


def rename_repr_fcn_compressor(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``1.{0,1}.*`` (element 0 is the parameter-free concatenation) → ``condition_encoder.fc.{0,1}.*``."""
    return {k: "condition_encoder.fc." + k.removeprefix("1.") for k in state}


def rename_decoder(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``0.1.*`` → ``decoder.fc.*``; ``{k}.{0,1}.*`` → ``decoder.blocks.{k-1}.{0,1}.*`` (k = 1..4);
    ``5.*`` → ``decoder.out.*``."""
    names = {}
    for k in state:
        head, _, rest = k.partition(".")
        if head == "0":
            names[k] = "decoder.fc." + rest.removeprefix("1.")
        elif head == "5":
            names[k] = "decoder.out." + rest
        else:
            names[k] = f"decoder.blocks.{int(head) - 1}.{rest}"
    return names


RENAMES = {
    "repr_compressors": rename_repr_compressors,
    "repr_fcn_compressor": rename_repr_fcn_compressor,
    "decoder": rename_decoder,
}


def _layerwise_structure(path: Path, state: dict[str, torch.Tensor], cfg: Config, purifier: Purifier) -> None:
    """Number of layers and convolutions per layer against the preset, with a message that says which."""
    layers: dict[int, set[int]] = {}
    for key in state:
        m = _LAYERWISE_KEY.match(key)
        if m:  # every key matches: check_role ran first
            layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    spec = purifier.spec
    if sorted(layers) != list(range(len(spec.layers))):
        raise CheckpointError(
            f"{path} holds {len(layers)} layerwise compressors, but preset '{cfg.name}' captures "
            f"{len(spec.layers)} representation layers (purifier.layers): wrong preset or wrong file?"
        )
    for i, convs in sorted(layers.items()):
        if convs != set(range(spec.layerwise_depth)):
            raise CheckpointError(
                f"{path}: layerwise compressor {i} has {len(convs)} convolutions, but preset '{cfg.name}' "
                f"uses {spec.layerwise_depth} (purifier.layerwise_depth; 3 for 32×32 inputs, 4 for 64×64, "
                "Tables 8/9): wrong preset or wrong file?"
            )


def purifier_state_from_reference(
    files: dict[str, tuple[Path, dict[str, torch.Tensor]]], cfg: Config, purifier: Purifier
) -> dict[str, torch.Tensor]:
    """Our purifier's inference state dict from the three published purifier files.

    Args:
        files: role → (path, state dict) for repr_compressors, repr_fcn_compressor, decoder.
        cfg: the preset (named in errors).
        purifier: an inference-only purifier of the preset (gives the expected keys and shapes).
    Returns:
        A state dict with exactly ``purifier.state_dict()``'s keys and shapes.
    """
    expected = purifier.state_dict()
    _layerwise_structure(*files["repr_compressors"][:2], cfg, purifier)
    out: dict[str, torch.Tensor] = {}
    for role, (path, state) in files.items():
        for old, new in RENAMES[role](state).items():
            tensor = state[old]
            if new not in expected:  # cannot happen after check_role + the structure check
                raise CheckpointError(f"{path} ({role}): unexpected key '{old}'")
            want = tuple(expected[new].shape)
            if tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"{path} ({role}): '{old}' has shape {tuple(tensor.shape)}, but preset '{cfg.name}' "
                    f"needs {want} for {new} — is the file from another scenario, or the preset wrong?"
                )
            out[new] = tensor
    for key, value in expected.items():
        if key not in out and key.endswith(_OPTIONAL_SUFFIX):
            out[key] = value.clone()
    missing = [k for k in expected if k not in out]
    if missing:  # every required key was checked per role; this guards the renaming itself
        raise CheckpointError(f"conversion left {len(missing)} purifier weights unset, e.g. {missing[0]}")
    return out


def convert_reference(
    cfg: Config,
    classifier: Path,
    repr_compressors: Path,
    repr_fcn_compressor: Path,
    decoder: Path,
) -> tuple[WideResNet, Purifier]:
    """The preset's classifier and inference purifier, loaded from the authors' published files."""
    files = {
        "repr_compressors": (Path(repr_compressors), _read(Path(repr_compressors), "repr_compressors")),
        "repr_fcn_compressor": (Path(repr_fcn_compressor), _read(Path(repr_fcn_compressor), "repr_fcn_compressor")),
        "decoder": (Path(decoder), _read(Path(decoder), "decoder")),
    }
    classifier = Path(classifier)
    model = build_classifier(cfg)
    ckpt.load_into(model, _read(classifier, "classifier"), what=f"classifier weights in {classifier}")
    model.eval()
    purifier = build_purifier(cfg, model, inference_only=True)
    state = purifier_state_from_reference(files, cfg, purifier)
    ckpt.load_into(purifier, state, what="converted purifier weights")
    return model, purifier.eval()


# ----------------------------------------------------------------------------------------------
# A run directory from the published files
# ----------------------------------------------------------------------------------------------


@dataclass
class ConvertResult:
    run: Path
    cfg: Config
    layers: int
    files: dict[str, Path]  # role → source file
    parameters: dict[str, int]  # "classifier", "condition_encoder", "decoder" → count


def run(
    kind: ConversionKind,
    cfg: Config,
    classifier: Path,
    repr_compressors: Path,
    repr_fcn_compressor: Path,
    decoder: Path,
    out: Path | None = None,
    force: bool = False,
) -> ConvertResult:
    """Convert and write a run directory (``out``, default ``runs/<preset>-reference-<time>``)."""
    if kind != ConversionKind.reference:  # pragma: no cover - the enum has one member
        raise CheckpointError(f"unknown conversion kind '{kind}'")
    if out is not None and not force:
        taken = [n for n in (ckpt.CONFIG_FILE, ckpt.CLASSIFIER_FILE, ckpt.PURIFIER_FILE) if (Path(out) / n).exists()]
        if taken:
            raise CheckpointError(f"{out} already holds a run ({taken[0]}); choose another --out or pass --force")
    model, purifier = convert_reference(cfg, classifier, repr_compressors, repr_fcn_compressor, decoder)
    run_dir = Path(out) if out is not None else ckpt.new_run_dir(f"{cfg.name}-reference")
    write_run(run_dir, cfg, model, purifier)
    files = {
        "classifier": Path(classifier),
        "repr_compressors": Path(repr_compressors),
        "repr_fcn_compressor": Path(repr_fcn_compressor),
        "decoder": Path(decoder),
    }
    ckpt.atomic_write_json(
        run_dir / PROVENANCE_FILE,
        {
            "kind": kind.value,
            "preset": cfg.name,
            "files": {role: {"path": str(p.resolve()), "sha256": ckpt.sha256_file(p)} for role, p in files.items()},
        },
    )
    return ConvertResult(
        run=run_dir,
        cfg=cfg,
        layers=len(purifier.spec.layers),
        files=files,
        parameters={
            "classifier": count_parameters(model),
            "condition_encoder": count_parameters(purifier.condition_encoder),
            "decoder": count_parameters(purifier.decoder),
        },
    )
