"""The purifier: a conditional VAE conditioned on the classifier's representation (section 4.3, appendix C.1).

Parts, each exactly as in the architecture tables of the later version's appendix C:

- ``input_encoder`` (Table 6), training only: two stride-2 3×3 convolutions 3→6→12.
- ``condition_encoder``: one layerwise CNN per representation layer (Table 8: 3 convolutions; Table 9:
  4), then the fully-connected representation encoder (Table 10) → code ``c`` of size fcrepr.
- ``joint_encoder`` (Table 11), training only: [input code, c] → fjoint → (μ, log σ²).
- ``decoder`` (Table 12 for 32×32, Table 13 for 64×64): [z, c] → reconstruction in [0, 1].

After training the input and joint encoders are discarded (section 4.1): inference is decoder-only,
``z ~ N(0, I)``. The submodule layout mirrors the authors' published files so that conversion is a
renaming of keys (see ``commands/convert.py``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from carso_cli.errors import CheckpointError

FORMAT_VERSION = 1

# Decoder variants: (side of the first feature map, output_padding of the 4 blocks, final kernel size).
DECODER_VARIANTS = {
    "32x32": (3, 0, 2),  # Table 12: 3 → 5 → 9 → 17 → 33 → (k=2, p=1) 32
    "64x64": (4, 1, 3),  # Table 13: 4 → 8 → 16 → 32 → 64 → (k=3, p=1) 64
}


@dataclass
class PurifierSpec:
    """Everything needed to rebuild a purifier without its preset (stored in the safetensors header)."""

    layers: list[str]
    layer_shapes: list[list[int]]  # (C, H, W) of each representation tensor
    image_size: int
    channels: int
    num_classes: int
    mean: list[float]
    std: list[float]
    fcrepr: int = 512
    fjoint: int = 128
    layerwise_depth: int = 3
    decoder: str = "32x32"
    decoder_channels: list[int] = field(default_factory=lambda: [256, 256, 128, 64, 32])
    input_encoder_channels: list[int] = field(default_factory=lambda: [6, 12])
    leaky_slope: float = 0.2

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": "carso-purifier",
            "format_version": str(FORMAT_VERSION),
            "spec": json.dumps(asdict(self)),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None, source: str = "file") -> PurifierSpec:
        if not metadata or metadata.get("format") != "carso-purifier":
            raise CheckpointError(f"{source} is not a carso purifier file (no carso-purifier header)")
        version = int(metadata.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has purifier format {version}; this carso reads up to {FORMAT_VERSION}: upgrade carso"
            )
        try:
            data = json.loads(metadata["spec"])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: damaged purifier header ({err})") from None


def _conv_block(c_in: int, c_out: int, stride: int, padding: int, slope: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(slope),
    )


def _fc_block(f_in: int, f_out: int, slope: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(f_in, f_out, bias=False), nn.BatchNorm1d(f_out), nn.LeakyReLU(slope))


def layerwise_channels(c: int, depth: int) -> list[int]:
    """Channels of a layerwise encoder (Tables 8/9): ceil(c/2), ceil(c/4), ceil(c/8) (, ceil(c/16))."""
    return [math.ceil(c / 2 ** (k + 1)) for k in range(depth)]


class ConditionEncoder(nn.Module):
    """Representation → code c: layerwise CNNs (Tables 8/9), then the FC encoder (Table 10)."""

    def __init__(self, spec: PurifierSpec) -> None:
        super().__init__()
        self.layerwise = nn.ModuleList()
        features = 0
        for name, (c, h, w) in zip(spec.layers, spec.layer_shapes):
            if min(h, w) <= 2 * spec.layerwise_depth:
                raise CheckpointError(
                    f"layer '{name}' is {h}×{w}: too small for {spec.layerwise_depth} unpadded 3×3 convolutions"
                )
            chans = [c, *layerwise_channels(c, spec.layerwise_depth)]
            self.layerwise.append(
                nn.Sequential(
                    *[_conv_block(chans[k], chans[k + 1], 1, 0, spec.leaky_slope) for k in range(spec.layerwise_depth)]
                )
            )
            side_h, side_w = h - 2 * spec.layerwise_depth, w - 2 * spec.layerwise_depth
            features += chans[-1] * side_h * side_w
        self.in_features = features
        self.fc = _fc_block(features, spec.fcrepr, spec.leaky_slope)

    def forward(self, representation: Sequence[torch.Tensor]) -> torch.Tensor:
        """representation: one (B, C_l, H_l, W_l) per layer → c: (B, fcrepr)."""
        if len(representation) != len(self.layerwise):
            raise ValueError(f"expected {len(self.layerwise)} representation tensors, got {len(representation)}")
        codes = [enc(t).flatten(1) for enc, t in zip(self.layerwise, representation)]
        return self.fc(torch.cat(codes, dim=1))


class InputEncoder(nn.Module):
    """Table 6: standardised input → flattened code (training only)."""

    def __init__(self, spec: PurifierSpec) -> None:
        super().__init__()
        c1, c2 = spec.input_encoder_channels
        self.convs = nn.Sequential(
            _conv_block(spec.channels, c1, 2, 1, spec.leaky_slope),
            _conv_block(c1, c2, 2, 1, spec.leaky_slope),
        )
        side = math.ceil(math.ceil(spec.image_size / 2) / 2)
        self.out_features = c2 * side * side
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Appendix C.1: inputs are standardised by the training-set statistics before this encoder.
        return self.convs((x - self.mean) / self.std).flatten(1)


class JointEncoder(nn.Module):
    """Table 11: [input code, c] → (μ, log σ²), each (B, fjoint) (training only)."""

    def __init__(self, in_features: int, spec: PurifierSpec) -> None:
        super().__init__()
        self.fc = _fc_block(in_features, spec.fjoint, spec.leaky_slope)
        self.mu = nn.Linear(spec.fjoint, spec.fjoint)
        self.logvar = nn.Linear(spec.fjoint, spec.fjoint)

    def forward(self, x_code: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(torch.cat([x_code, c], dim=1))
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    """Tables 12/13: [z, c] (in this order) → reconstruction (B, channels, size, size) in [0, 1]."""

    def __init__(self, spec: PurifierSpec) -> None:
        super().__init__()
        if spec.decoder not in DECODER_VARIANTS:
            raise CheckpointError(f"unknown decoder variant '{spec.decoder}'")
        side, out_pad, last_k = DECODER_VARIANTS[spec.decoder]
        ch = spec.decoder_channels
        self.side = side
        self.fc = nn.Linear(spec.fjoint + spec.fcrepr, ch[0] * side * side)
        self.act = nn.LeakyReLU(spec.leaky_slope)
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(
                    nn.ConvTranspose2d(ch[k], ch[k + 1], 3, stride=2, padding=1, output_padding=out_pad, bias=False),
                    nn.BatchNorm2d(ch[k + 1]),
                    nn.LeakyReLU(spec.leaky_slope),
                )
                for k in range(4)
            ]
        )
        self.out = nn.ConvTranspose2d(ch[4], spec.channels, last_k, stride=1, padding=1, bias=True)

    def forward(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(torch.cat([z, c], dim=1)))
        h = h.view(h.shape[0], -1, self.side, self.side)
        return torch.sigmoid(self.out(self.blocks(h)))


class Purifier(nn.Module):
    """The conditional VAE. ``inference_only`` builds just the condition encoder and the decoder."""

    def __init__(self, spec: PurifierSpec, inference_only: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.condition_encoder = ConditionEncoder(spec)
        self.decoder = Decoder(spec)
        self.input_encoder: InputEncoder | None = None
        self.joint_encoder: JointEncoder | None = None
        if not inference_only:
            self.input_encoder = InputEncoder(spec)
            self.joint_encoder = JointEncoder(self.input_encoder.out_features + spec.fcrepr, spec)

    @property
    def inference_only(self) -> bool:
        return self.input_encoder is None

    def forward(
        self, x: torch.Tensor, representation: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: clean-target VAE. Returns (reconstruction, μ, log σ²)."""
        if self.input_encoder is None or self.joint_encoder is None:
            raise RuntimeError("this purifier was built for inference only (no input/joint encoder)")
        c = self.condition_encoder(representation)
        mu, logvar = self.joint_encoder(self.input_encoder(x), c)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation trick
        return self.decoder(z, c), mu, logvar

    def sample(self, representation: Sequence[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """Decoder-only inference.

        Args:
            representation: one (B, C_l, H_l, W_l) tensor per layer.
            z: (N, B, fjoint) latent samples (N reconstructions per input).
        Returns:
            (N, B, channels, H, W) reconstructions; the N×B decodes run as one batch.
        """
        n, b = z.shape[0], z.shape[1]
        c = self.condition_encoder(representation)  # (B, fcrepr)
        c = c.unsqueeze(0).expand(n, -1, -1).reshape(n * b, -1)
        x_hat = self.decoder(z.reshape(n * b, -1), c)
        return x_hat.view(n, b, *x_hat.shape[1:])

    def inference_state_dict(self) -> dict[str, torch.Tensor]:
        """The parts that inference keeps: condition encoder and decoder."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("condition_encoder.", "decoder."))}


def spec_from_config(cfg, layers: list[str], layer_shapes: Sequence[Sequence[int]]) -> PurifierSpec:
    """A PurifierSpec from a preset (cfg: carso_cli.config.Config) and the classifier's layer shapes."""
    p = cfg.purifier
    return PurifierSpec(
        layers=list(layers),
        layer_shapes=[list(s) for s in layer_shapes],
        image_size=cfg.data.image_size,
        channels=cfg.data.channels,
        num_classes=cfg.data.num_classes,
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        fcrepr=p.fcrepr,
        fjoint=p.fjoint,
        layerwise_depth=p.layerwise_depth,
        decoder=p.decoder,
        decoder_channels=list(p.decoder_channels),
        input_encoder_channels=list(p.input_encoder_channels),
        leaky_slope=p.leaky_slope,
    )
