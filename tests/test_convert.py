"""``carso convert reference``: the authors' published files → a run that computes exactly the same.

The reference modules are rebuilt here in the authors' structure (``nn.ModuleList`` of
``nn.Sequential``, the ``Concatenate(flatten=True)`` adapters, the ``nn.Identity`` fourth element for
32×32), given random weights and non-trivial BatchNorm statistics, saved with
``safetensors.torch.save_model`` as the authors did, converted, and compared output for output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch import nn
from typer.testing import CliRunner

from carso_cli.cli import app
from carso_cli.config import Config, load_config
from carso_cli.models import CARSO, build_classifier, convert, load_run, purifier_spec_for
from carso_cli.models.purifier import DECODER_VARIANTS, Purifier, PurifierSpec, layerwise_channels
from carso_cli.models.representation import forward_with_representation

runner = CliRunner()

# A 64×64 variant of the smoke preset: 4-convolution layerwise encoders (Table 9), 64×64 decoder (Table 13).
SMOKE64 = {"data.image_size": 64, "purifier.layerwise_depth": 4, "purifier.decoder": "64x64"}


# ----------------------------------------------------------------------------------------------
# The authors' module structure (tooling/modelpieces.py of their repository), rebuilt
# ----------------------------------------------------------------------------------------------


class Concatenate(nn.Module):
    """ebtorch's ``Concatenate(flatten=True)``: flatten each tensor from dim 1, concatenate on dim 1."""

    def forward(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat([t.flatten(1) for t in tensors], dim=1)


def _conv_block(c_in: int, c_out: int, slope: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 0, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(slope))


def reference_modules(spec: PurifierSpec) -> tuple[nn.ModuleList, nn.Sequential, nn.Sequential]:
    """(repr_compressors, repr_fcn_compressor, decoder) exactly as the authors' CARSOWrap builds them."""
    compressors = nn.ModuleList()
    features = 0
    for c, h, w in spec.layer_shapes:
        chans = [c, *layerwise_channels(c, spec.layerwise_depth)]
        blocks: list[nn.Module] = [
            _conv_block(chans[k], chans[k + 1], spec.leaky_slope) for k in range(spec.layerwise_depth)
        ]
        if spec.layerwise_depth == 3:
            blocks.append(nn.Identity())  # the authors' 4th element for 32×32 inputs
        compressors.append(nn.Sequential(*blocks))
        features += chans[-1] * (h - 2 * spec.layerwise_depth) * (w - 2 * spec.layerwise_depth)
    fcn = nn.Sequential(
        Concatenate(),
        nn.Sequential(
            nn.Linear(features, spec.fcrepr, bias=False), nn.BatchNorm1d(spec.fcrepr), nn.LeakyReLU(spec.leaky_slope)
        ),
    )
    side, out_pad, last_k = DECODER_VARIANTS[spec.decoder]
    ch = spec.decoder_channels
    decoder = nn.Sequential(
        nn.Sequential(
            Concatenate(),
            nn.Linear(spec.fjoint + spec.fcrepr, ch[0] * side * side),
            nn.LeakyReLU(spec.leaky_slope),
            nn.Unflatten(1, (ch[0], side, side)),
        ),
        *[
            nn.Sequential(
                nn.ConvTranspose2d(ch[k], ch[k + 1], 3, 2, 1, out_pad, bias=False),
                nn.BatchNorm2d(ch[k + 1]),
                nn.LeakyReLU(spec.leaky_slope),
            )
            for k in range(4)
        ],
        nn.ConvTranspose2d(ch[4], spec.channels, last_k, 1, 1, 0, bias=True),
        nn.Sigmoid(),
    )
    return compressors, fcn, decoder


def randomise_(*modules: nn.Module) -> None:
    """Random weights and non-trivial BatchNorm statistics (so a wrong mapping cannot go unnoticed)."""
    with torch.no_grad():
        for module in modules:
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
                    m.running_mean.normal_(0, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
                    m.num_batches_tracked.fill_(123)
            module.eval()


def reference_forward(
    classifier: nn.Module,
    modules: tuple[nn.ModuleList, nn.Sequential, nn.Sequential],
    layers: list[str],
    x: torch.Tensor,
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' inference: (reconstructions (N, B, C, H, W), logits (N, B, classes)), one z at a time."""
    compressors, fcn, decoder = modules
    _, representation = forward_with_representation(classifier, layers, x, keep_graph=False)
    c = fcn([m(t) for m, t in zip(compressors, representation)])
    x_hat = torch.stack([decoder((z[n], c)) for n in range(z.shape[0])])
    logits = torch.stack([classifier(x_hat[n]) for n in range(z.shape[0])])
    return x_hat, logits


def published_files(tmp: Path, cfg: Config, seed: int = 0):
    """Write the four files as the authors did; return (paths by role, classifier, reference modules, spec)."""
    torch.manual_seed(seed)
    classifier = build_classifier(cfg).eval()
    randomise_(classifier)
    spec = purifier_spec_for(cfg, classifier)
    modules = reference_modules(spec)
    randomise_(*modules)
    tmp.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, module in zip(
        ("classifier", "repr_compressors", "repr_fcn_compressor", "decoder"), (classifier, *modules)
    ):
        paths[role] = tmp / f"wrn_{cfg.name}_{role}.safetensors"
        save_model(module, str(paths[role]))
    return paths, classifier, modules, spec


def _args(paths: dict[str, Path]) -> list[str]:
    return [
        "--classifier",
        str(paths["classifier"]),
        "--repr-compressors",
        str(paths["repr_compressors"]),
        "--repr-fcn-compressor",
        str(paths["repr_fcn_compressor"]),
        "--decoder",
        str(paths["decoder"]),
    ]


def _smoke64() -> Config:
    return load_config("smoke", SMOKE64)


# ----------------------------------------------------------------------------------------------
# Equality with the reference modules
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["32x32", "64x64"])
def test_converted_purifier_computes_what_the_reference_computes(tmp_path: Path, variant: str) -> None:
    cfg = load_config("smoke") if variant == "32x32" else _smoke64()
    paths, classifier, modules, spec = published_files(tmp_path, cfg)
    model, purifier = convert.convert_reference(cfg, **paths)
    assert purifier.inference_only and purifier.spec.layerwise_depth == (3 if variant == "32x32" else 4)

    # The classifier is copied bit for bit.
    for key, value in classifier.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key

    torch.manual_seed(1)
    x = torch.rand(3, 3, cfg.data.image_size, cfg.data.image_size)
    z = torch.randn(4, 3, spec.fjoint)
    with torch.no_grad():
        ref_x_hat, ref_logits = reference_forward(classifier, modules, spec.layers, x, z)
        _, representation = forward_with_representation(model, spec.layers, x, keep_graph=False)
        # Same batch shapes as the reference: bit-identical.
        compressors, fcn, decoder = modules
        ref_c = fcn([m(t) for m, t in zip(compressors, representation)])
        c = purifier.condition_encoder(representation)
        assert torch.equal(c, ref_c)
        assert torch.equal(purifier.decoder(z[0], c), decoder((z[0], ref_c)))
        # Our batched path (all N×B decodes in one call) and the whole CARSO model.
        x_hat = purifier.sample(representation, z)
        carso = CARSO(model, purifier, samples=4, aggregation="logit")
        logits = carso.reconstruction_logits(x, z)
    assert x_hat.shape == ref_x_hat.shape == (4, 3, 3, cfg.data.image_size, cfg.data.image_size)
    torch.testing.assert_close(x_hat, ref_x_hat, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert ref_x_hat.std() > 0.01  # a real image, not a saturated sigmoid


def test_cli_writes_a_run_that_loads_and_matches(tmp_path: Path) -> None:
    cfg = load_config("smoke")
    paths, classifier, modules, spec = published_files(tmp_path / "published", cfg)
    out = tmp_path / "runs" / "reference"
    result = runner.invoke(app, ["convert", "reference", "--preset", "smoke", *_args(paths), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "carso eval --run" in result.output
    loaded = load_run(out)
    assert loaded.cfg.name == "smoke" and loaded.purifier.spec.layers == spec.layers
    provenance = json.loads((out / convert.PROVENANCE_FILE).read_text())
    assert set(provenance["files"]) == {"classifier", "repr_compressors", "repr_fcn_compressor", "decoder"}

    x = torch.rand(2, 3, 32, 32)
    z = torch.randn(3, 2, spec.fjoint)
    with torch.no_grad():
        _, ref_logits = reference_forward(classifier, modules, spec.layers, x, z)
        logits = loaded.carso(samples=3, aggregation="logit").reconstruction_logits(x, z)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)

    # An existing run is not overwritten without --force.
    again = runner.invoke(app, ["convert", "reference", "--preset", "smoke", *_args(paths), "--out", str(out)])
    assert again.exit_code == 1 and "already holds a run" in again.output and "Traceback" not in again.output
    forced = runner.invoke(app, ["convert", "reference", "-p", "smoke", *_args(paths), "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output


@pytest.mark.parametrize("preset", ["cifar10", "cifar100", "tinyimagenet", "smoke"])
def test_renaming_covers_every_preset_exactly(preset: str) -> None:
    """For every preset (on the meta device: no memory), the authors' keys map onto ours, shapes equal."""
    cfg = load_config(preset)
    spec = purifier_spec_for(cfg)
    with torch.device("meta"):
        modules = reference_modules(spec)
        ours = Purifier(spec, inference_only=True).state_dict()
    renamed = {}
    for role, module in zip(("repr_compressors", "repr_fcn_compressor", "decoder"), modules):
        state = module.state_dict()
        assert convert.detect_role(set(state)) == role
        for old, new in convert.RENAMES[role](state).items():
            renamed[new] = tuple(state[old].shape)
    assert renamed == {k: tuple(v.shape) for k, v in ours.items()}


# ----------------------------------------------------------------------------------------------
# Errors: wrong role, wrong shapes, missing files
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return published_files(tmp_path_factory.mktemp("published"), load_config("smoke"))[0]


def _convert(paths: dict[str, Path], out: Path, *extra: str):
    return runner.invoke(app, ["convert", "reference", "--preset", "smoke", *_args(paths), "--out", str(out), *extra])


@pytest.mark.parametrize(
    ("role", "given", "expect"),
    [
        ("repr_compressors", "decoder", "does not look like repr_compressors (expected keys like '0.0.0.weight'"),
        ("decoder", "repr_fcn_compressor", "does not look like decoder"),
        ("repr_fcn_compressor", "repr_compressors", "it looks like the repr_compressors file"),
        ("classifier", "decoder", "does not look like classifier"),
    ],
)
def test_a_file_in_the_wrong_role_is_a_clear_error(
    smoke_files: dict[str, Path], tmp_path: Path, role: str, given: str, expect: str
) -> None:
    paths = {**smoke_files, role: smoke_files[given]}
    result = _convert(paths, tmp_path / "out")
    assert result.exit_code == 1
    assert expect in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # nothing is written on failure


def test_files_of_another_scenario_are_a_clear_error(smoke_files: dict[str, Path], tmp_path: Path) -> None:
    # 64×64 layerwise compressors (4 convolutions) with the 32×32 preset.
    paths64, *_ = published_files(tmp_path / "p64", _smoke64())
    result = _convert({**smoke_files, "repr_compressors": paths64["repr_compressors"]}, tmp_path / "out")
    assert result.exit_code == 1 and "has 4 convolutions, but preset 'smoke' uses 3" in result.output
    # A preset with another code size: the shapes no longer fit.
    result = _convert(smoke_files, tmp_path / "out", "--set", "purifier.fcrepr=32")
    assert result.exit_code == 1 and "has shape" in result.output and "needs" in result.output
    # Fewer representation layers in the preset than compressors in the file.
    result = _convert(smoke_files, tmp_path / "out", "--set", 'purifier.layers=["layer.0.block.0.conv_0"]')
    assert result.exit_code == 1 and "holds 6 layerwise compressors" in result.output


def test_missing_and_damaged_files_are_clear_errors(smoke_files: dict[str, Path], tmp_path: Path) -> None:
    result = _convert({**smoke_files, "decoder": tmp_path / "nope.safetensors"}, tmp_path / "out")
    assert result.exit_code == 1 and "--decoder: file not found" in result.output
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(smoke_files["decoder"].read_bytes()[:100])
    result = _convert({**smoke_files, "decoder": bad}, tmp_path / "out")
    assert result.exit_code == 1 and "not a readable safetensors file" in result.output
    assert "Traceback" not in result.output


def test_kind_is_a_choice(smoke_files: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["convert", "authors", "--preset", "smoke", *_args(smoke_files)])
    assert result.exit_code == 2 and "reference" in result.output
