"""Capturing the classifier's internal representation with forward hooks.

The representation (section 4.1) is the list of the hooked modules' outputs — (pre)activations —
in execution order. Hooks are removed when the capture ends, also when an exception is raised.
With ``keep_graph=True`` the tensors stay in the autograd graph, which end-to-end attacks need.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from carso_cli.errors import ConfigError

# Rules a preset may give instead of an explicit list of layer names.
LAYER_RULES = {
    # every convolution inside a residual block (conv_0 and conv_1)
    "block-convs": lambda name: name.endswith((".conv_0", ".conv_1")),
    # the same plus every shortcut convolution
    "block-convs+shortcuts": lambda name: name.endswith((".conv_0", ".conv_1", ".shortcut")),
}


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise a ConfigError naming the closest valid names for any layer the model does not have."""
    names = module_names(model)
    known = set(names)
    for layer in layers:
        if layer not in known:
            close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
            hint = f" (nearest: {', '.join(close)})" if close else ""
            raise ConfigError(f"the classifier has no layer '{layer}'{hint}")


def resolve_layers(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Layer names from a preset's ``purifier.layers`` (a list, or ``"rule:NAME"``), validated."""
    if isinstance(spec, str):
        rule = spec.removeprefix("rule:")
        if rule not in LAYER_RULES:
            raise ConfigError(f"unknown layer rule '{spec}' (rules: {', '.join('rule:' + r for r in LAYER_RULES)})")
        layers = [n for n in module_names(model) if LAYER_RULES[rule](n)]
        if not layers:
            raise ConfigError(f"layer rule '{spec}' selects no layer of this classifier")
        return layers
    layers = list(spec)
    if not layers:
        raise ConfigError("purifier.layers is empty")
    if len(set(layers)) != len(layers):
        raise ConfigError("purifier.layers names a layer twice")
    check_layers(model, layers)
    return layers


@contextmanager
def capture(model: nn.Module, layers: Sequence[str], keep_graph: bool = True) -> Iterator[list[torch.Tensor]]:
    """Hook ``layers`` of ``model``; the yielded list fills with their outputs in execution order.

    Example::

        with capture(classifier, layers) as representation:
            logits = classifier(x)
        # representation: list of (B, C_l, H_l, W_l) tensors, one per layer

    A layer that runs more than once per forward contributes once per call. Hooks are removed on exit,
    also when the body raises.
    """
    check_layers(model, layers)
    modules = dict(model.named_modules())
    outputs: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        outputs.append(output if keep_graph else output.detach())

    handles = [modules[name].register_forward_hook(hook) for name in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def forward_with_representation(
    model: nn.Module, layers: Sequence[str], x: torch.Tensor, keep_graph: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, representation) of one forward pass."""
    with capture(model, layers, keep_graph=keep_graph) as representation:
        logits = model(x)
    if len(representation) != len(layers):
        raise RuntimeError(
            f"captured {len(representation)} tensors for {len(layers)} layers: a layer ran a different "
            "number of times than once per forward"
        )
    return logits, list(representation)


def execution_order(model: nn.Module, layers: Sequence[str], input_shape: Sequence[int]) -> list[str]:
    """``layers`` sorted by when they run in a forward pass of one (1, *input_shape) input."""
    order: list[str] = []
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda *_a, _n=name: order.append(_n)) for name in layers
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=_device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
    return order


def representation_shapes(
    model: nn.Module, layers: Sequence[str], input_shape: Sequence[int]
) -> list[tuple[int, ...]]:
    """Per-layer (C, H, W) of the representation for inputs of ``input_shape`` (C, H, W).

    Runs on the meta device when the model is there (no memory, no compute), else on a 1-image batch.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_shape, device=_device_of(model))
            _, rep = forward_with_representation(model, layers, x, keep_graph=False)
    finally:
        model.train(was_training)
    return [tuple(t.shape[1:]) for t in rep]


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
