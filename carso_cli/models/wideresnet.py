"""WideResNet in the DeepMind layout (RobustBench's ``DMWideResNet``).

The module names are those of the published robust checkpoints (Cui et al. 2023, Wang et al. 2023)
and of the paper's Table 7: ``init_conv``, ``layer.{g}.block.{b}.{batchnorm_0, relu_0, conv_0,
batchnorm_1, relu_1, conv_1, shortcut}``, ``batchnorm``, ``relu``, ``logits``. Inputs are in [0, 1];
normalisation by the dataset mean/std happens inside the model so that every attack works in pixel
space. Mean and std are non-persistent buffers: the published state dicts do not hold them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU}


class Block(nn.Module):
    """Pre-activation residual block; a block with a shortcut convolves the *activated* input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=0.01)
        self.relu_0 = activation()
        # Padding 0 plus explicit padding in forward reproduces TensorFlow's 'SAME' (DeepMind's origin).
        self.conv_0 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=0.01)
        self.relu_1 = activation()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
            if self.has_shortcut
            else None
        )
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu_0(self.batchnorm_0(x))
        if self.has_shortcut:
            x = activated  # the shortcut sees the activated input, as in DeepMind's code
        v = F.pad(activated, (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1))
        out = self.conv_0(v)
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        # The shortcut runs after conv_1: this is the execution order Table 7 lists.
        residual = self.shortcut(x) if self.shortcut is not None else x
        return residual + out


class BlockGroup(nn.Module):
    def __init__(
        self, num_blocks: int, in_planes: int, out_planes: int, stride: int, activation: type[nn.Module]
    ) -> None:
        super().__init__()
        self.block = nn.Sequential(
            *[
                Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, activation)
                for i in range(num_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNet(nn.Module):
    """WideResNet-depth-width with inputs in [0, 1] and global average pooling (any input size)."""

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 28,
        width: int = 10,
        activation: str = "silu",
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2471, 0.2435, 0.2616),
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError("depth must be 6n + 4")
        act = ACTIVATIONS[activation]
        num_blocks = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.init_conv = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            BlockGroup(num_blocks, channels[0], channels[1], 1, act),
            BlockGroup(num_blocks, channels[1], channels[2], 2, act),
            BlockGroup(num_blocks, channels[2], channels[3], 2, act),
        )
        self.batchnorm = nn.BatchNorm2d(channels[3], momentum=0.01)
        self.relu = act()
        self.logits = nn.Linear(channels[3], num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [0, 1] → logits (B, num_classes)."""
        out = (x - self.mean) / self.std
        out = self.init_conv(out)
        out = self.layer(out)
        out = self.relu(self.batchnorm(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.logits(out)


def build_classifier(cfg) -> WideResNet:  # cfg: carso_cli.config.Config
    """The preset's classifier, randomly initialised (load weights with checkpoint.load_classifier)."""
    return WideResNet(
        num_classes=cfg.data.num_classes,
        depth=cfg.classifier.depth,
        width=cfg.classifier.width,
        activation=cfg.classifier.activation,
        mean=cfg.data.mean,
        std=cfg.data.std,
        in_channels=cfg.data.channels,
    )
