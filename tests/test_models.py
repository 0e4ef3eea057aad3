"""Classifier (DeepMind WideResNet layout), representation capture and purifier architecture."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carso_cli.config import load_config
from carso_cli.errors import CheckpointError, ConfigError
from carso_cli.models import Purifier, build_classifier, purifier_spec_for
from carso_cli.models.purifier import layerwise_channels
from carso_cli.models.representation import capture, forward_with_representation, resolve_layers
from carso_cli.models.wideresnet import WideResNet


# --- an independent transcription of RobustBench's DMWideResNet, to check layout and maths ---------
class _RefBlock(nn.Module):
    def __init__(self, i, o, s, act):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(i, momentum=0.01)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(i, o, 3, s, 0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(o, momentum=0.01)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.has_shortcut = i != o
        self.shortcut = nn.Conv2d(i, o, 1, s, 0, bias=False) if self.has_shortcut else None
        self._stride = s

    def forward(self, x):
        if self.has_shortcut:
            x = self.relu_0(self.batchnorm_0(x))
        else:
            out = self.relu_0(self.batchnorm_0(x))
        v = x if self.has_shortcut else out
        v = F.pad(v, (1, 1, 1, 1)) if self._stride == 1 else F.pad(v, (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        return torch.add(self.shortcut(x) if self.has_shortcut else x, out)


class _RefGroup(nn.Module):
    def __init__(self, n, i, o, s, act):
        super().__init__()
        self.block = nn.Sequential(*[_RefBlock(i if k == 0 else o, o, s if k == 0 else 1, act) for k in range(n)])

    def forward(self, x):
        return self.block(x)


class _RefDMWideResNet(nn.Module):
    def __init__(self, classes, depth, width, act, mean, std):
        super().__init__()
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        n = (depth - 4) // 6
        c = [16, 16 * width, 32 * width, 64 * width]
        self.init_conv = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.layer = nn.Sequential(
            _RefGroup(n, c[0], c[1], 1, act), _RefGroup(n, c[1], c[2], 2, act), _RefGroup(n, c[2], c[3], 2, act)
        )
        self.batchnorm = nn.BatchNorm2d(c[3], momentum=0.01)
        self.relu = act()
        self.logits = nn.Linear(c[3], classes)
        self.c = c[3]

    def forward(self, x):
        out = self.layer(self.init_conv((x - self.mean) / self.std))
        out = F.avg_pool2d(self.relu(self.batchnorm(out)), 8)
        return self.logits(out.view(-1, self.c))


def _randomise_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("activation, ref_act", [("silu", nn.SiLU), ("relu", nn.ReLU)])
def test_wideresnet_matches_deepmind_layout_and_outputs(activation, ref_act) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ref = _RefDMWideResNet(10, 16, 2, ref_act, mean, std).eval()
    _randomise_bn(ref)
    ours = WideResNet(10, 16, 2, activation, mean, std).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())  # same keys, same order: mean/std not saved
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_wrn_28_10_names_and_64px_input() -> None:
    with torch.device("meta"):
        model = WideResNet(200, 28, 10, "silu")
    names = {n for n, _ in model.named_modules()}
    for name in ("init_conv", "layer.2.block.3.conv_1", "layer.1.block.0.shortcut", "batchnorm", "relu", "logits"):
        assert name in names
    assert "layer.1.block.1.shortcut" not in names  # only the first block of a group changes width
    assert model(torch.zeros(2, 3, 64, 64, device="meta")).shape == (2, 200)  # global average pooling


def test_capture_in_execution_order_and_hooks_removed() -> None:
    model = WideResNet(10, 10, 1).eval()
    layers = ["layer.1.block.0.conv_0", "layer.1.block.0.conv_1", "layer.1.block.0.shortcut"]
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    logits, rep = forward_with_representation(model, layers, x, keep_graph=True)
    assert [tuple(t.shape) for t in rep] == [(2, 32, 16, 16)] * 3
    assert all(t.requires_grad for t in rep)
    rep[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    _, detached = forward_with_representation(model, layers, x, keep_graph=False)
    assert not any(t.requires_grad for t in detached)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, layers):
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_unknown_layer_lists_nearest_names() -> None:
    model = WideResNet(10, 10, 1)
    with pytest.raises(
        ConfigError, match=r"no layer 'layer\.0\.block\.0\.conv_2'.*nearest: .*layer\.0\.block\.0\.conv_"
    ):
        resolve_layers(model, ["layer.0.block.0.conv_2"])
    with pytest.raises(ConfigError, match="unknown layer rule"):
        resolve_layers(model, "rule:everything")
    assert resolve_layers(model, "rule:block-convs") == [
        f"layer.{g}.block.0.conv_{k}" for g in range(3) for k in (0, 1)
    ]


def _expected_fc_in(size: int, depth: int) -> int:
    """Features entering the FC representation encoder per Tables 7–9 for WRN-28-10."""
    total = 0
    for g, (c, side) in enumerate([(160, size), (320, size // 2), (640, size // 4)]):
        n_layers = 8 + (1 if g > 0 else 0)  # 4 blocks × (conv_0, conv_1), plus the group's shortcut
        out_c = math.ceil(c / 2**depth)
        out_side = side - 2 * depth
        total += n_layers * out_c * out_side * out_side
    return total


@pytest.mark.parametrize("preset, size, depth", [("cifar10", 32, 3), ("cifar100", 32, 3), ("tinyimagenet", 64, 4)])
def test_paper_purifier_sizes(preset, size, depth) -> None:
    cfg = load_config(preset)
    spec = purifier_spec_for(cfg)
    with torch.device("meta"):
        purifier = Purifier(spec)
    fc_in = _expected_fc_in(size, depth)
    if preset == "cifar10":
        assert fc_in == 147_040  # scenario (a): the representation FC layer alone is 147,040 × 512
    enc = purifier.condition_encoder
    assert tuple(enc.fc[0].weight.shape) == (cfg.purifier.fcrepr, fc_in) and enc.fc[0].bias is None
    assert len(enc.layerwise) == 26
    first = enc.layerwise[0]
    assert [blk[0].out_channels for blk in first] == layerwise_channels(160, depth)
    assert all(blk[0].bias is None and blk[0].padding == (0, 0) and blk[0].stride == (1, 1) for blk in first)
    # Table 6: 3→6→12, stride 2, no bias
    ie = purifier.input_encoder
    assert [b[0].out_channels for b in ie.convs] == [6, 12] and ie.out_features == 12 * (size // 4) ** 2
    # Table 11: Linear(12·(s/4)² + fcrepr → fjoint), two fjoint heads
    je = purifier.joint_encoder
    fj = cfg.purifier.fjoint
    assert tuple(je.fc[0].weight.shape) == (fj, ie.out_features + cfg.purifier.fcrepr)
    assert tuple(je.mu.weight.shape) == (fj, fj) and tuple(je.logvar.weight.shape) == (fj, fj)
    # Tables 12/13: Linear(fjoint + fcrepr → 256·s0²) with bias, 4 ConvT blocks, ConvT with bias, Sigmoid
    dec = purifier.decoder
    s0 = 3 if size == 32 else 4
    assert tuple(dec.fc.weight.shape) == (256 * s0 * s0, fj + cfg.purifier.fcrepr) and dec.fc.bias is not None
    assert [b[0].out_channels for b in dec.blocks] == [256, 128, 64, 32]
    assert all(b[0].bias is None for b in dec.blocks) and dec.out.bias is not None
    linear = (fj + cfg.purifier.fcrepr) * 256 * s0 * s0 + 256 * s0 * s0
    convt = sum(9 * i * o + 2 * o for i, o in [(256, 256), (256, 128), (128, 64), (64, 32)])
    last_k = 2 if size == 32 else 3
    assert sum(p.numel() for p in dec.parameters()) == linear + convt + last_k * last_k * 32 * 3 + 3


@pytest.mark.parametrize("size", [32, 64])
def test_purifier_shapes_and_ranges(size) -> None:
    overrides = {
        "data.image_size": size,
        "purifier.decoder": f"{size}x{size}",
        "purifier.layerwise_depth": 3 if size == 32 else 4,
    }
    cfg = load_config("smoke", overrides)
    torch.manual_seed(0)
    classifier = build_classifier(cfg).eval()
    purifier = Purifier(purifier_spec_for(cfg, classifier))
    x = torch.rand(4, 3, size, size)
    _, rep = forward_with_representation(classifier, purifier.spec.layers, x, keep_graph=False)
    x_hat, mu, logvar = purifier(x, rep)
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (4, cfg.purifier.fjoint)
    assert x_hat.min() >= 0 and x_hat.max() <= 1
    purifier.eval()
    samples = purifier.sample(rep, torch.randn(5, 4, cfg.purifier.fjoint))
    assert samples.shape == (5, 4, 3, size, size)


def test_inference_only_purifier_refuses_training_pass(smoke_cfg) -> None:
    purifier = Purifier(purifier_spec_for(smoke_cfg), inference_only=True)
    assert purifier.input_encoder is None and purifier.joint_encoder is None
    assert set(purifier.state_dict()) == set(purifier.inference_state_dict())
    with pytest.raises(RuntimeError, match="inference only"):
        purifier(torch.rand(1, 3, 32, 32), [])


def test_too_small_layer_is_a_clear_error() -> None:
    cfg = load_config("smoke", {"purifier.layerwise_depth": 5})
    with pytest.raises(CheckpointError, match="too small"):
        Purifier(purifier_spec_for(cfg))
