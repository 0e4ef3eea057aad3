"""Capturing the classifier's internal representation with forward hooks.

The representation (section 4.1) is the list of the hooked modules' outputs — (pre)activations —
in execution order. Hooks are removed when the capture ends, also when an exception is raised.
With ``keep_graph=True`` the tensors stay in the autograd graph, which end-to-end attacks need.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

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


GLOB_CHARS = "*?["


def _match(model: nn.Module, pattern: str) -> list[str]:
    """Module names matching a glob pattern (``fnmatch``: ``*`` also crosses dots), in registration order."""
    names = [n for n in module_names(model) if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        plain = pattern.replace("*", "0").replace("?", "0")
        close = difflib.get_close_matches(plain, module_names(model), n=5, cutoff=0.5)
        hint = f" (nearest names: {', '.join(close)})" if close else ""
        raise ConfigError(f"purifier.layers pattern '{pattern}' matches no layer of the classifier{hint}")
    return names


def resolve_layers(
    model: nn.Module, spec: str | Sequence[str], input_shape: Sequence[int] | None = None, min_side: int = 0
) -> list[str]:
    """Layer names from a preset's ``purifier.layers``, validated.

    ``spec``: ``"auto"`` (``auto_layers``: needs ``input_shape``, (C, H, W); layers not larger than
    ``min_side`` are left out), ``"rule:NAME"``, or a list of names and glob patterns (``"layer1.*.conv1"``).
    """
    if spec == "auto":
        if input_shape is None:
            raise TypeError("purifier.layers = 'auto' needs the input shape")
        return auto_layers(model, input_shape, min_side)
    if isinstance(spec, str):
        rule = spec.removeprefix("rule:")
        if rule not in LAYER_RULES:
            raise ConfigError(
                f"unknown layer rule '{spec}' (rules: auto, {', '.join('rule:' + r for r in LAYER_RULES)})"
            )
        layers = [n for n in module_names(model) if LAYER_RULES[rule](n)]
        if not layers:
            raise ConfigError(f"layer rule '{spec}' selects no layer of this classifier")
        return layers
    entries = list(spec)
    if not entries:
        raise ConfigError("purifier.layers is empty")
    plain = [e for e in entries if not any(c in e for c in GLOB_CHARS)]
    if len(set(plain)) != len(plain):
        raise ConfigError("purifier.layers names a layer twice")
    check_layers(model, plain)
    layers: list[str] = []
    for entry in entries:
        for name in _match(model, entry) if any(c in entry for c in GLOB_CHARS) else [entry]:
            if name not in layers:  # a pattern may overlap another entry
                layers.append(name)
    return layers


# --------------------------------------------------------------------------------------------------
# "auto": the paper's rule for any residual network
# --------------------------------------------------------------------------------------------------

# A block's skip-connection submodule is recognised by its name, as the common model zoos spell it
# (DeepMind/RobustBench "shortcut", torchvision/timm "downsample", "convShortcut", "skip").
SHORTCUT_WORDS = ("shortcut", "downsample", "skip")


@dataclass
class Candidate:
    """A module whose output is an image-shaped (C, H, W) tensor, i.e. a possible representation layer."""

    name: str
    shape: tuple[int, ...]  # (C, H, W) of its output
    in_side: int | None  # spatial side of its input (None when the input is not image-shaped)


def _conv_count(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def _is_stage(module: nn.Module) -> bool:
    """A Sequential / ModuleList whose children are all blocks (submodules with two convolutions or more)."""
    children = list(module.children())
    return (
        isinstance(module, (nn.Sequential, nn.ModuleList))
        and bool(children)
        and all(not isinstance(c, nn.Conv2d) and _conv_count(c) >= 2 for c in children)
    )


def residual_stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(stage, [blocks]) of a residual network: the innermost containers of blocks, in registration order.

    WideResNet: ``layer.0.block`` → ``layer.0.block.0`` … (``layer`` itself holds stages, not blocks);
    torchvision / timm / RobustBench ResNets: ``layer1`` → ``layer1.0`` ….
    """
    stages = [n for n, m in model.named_modules() if _is_stage(m)]
    innermost = [s for s in stages if not any(o != s and o.startswith(f"{s}.") for o in stages)]
    modules = dict(model.named_modules())
    return [(s, [f"{s}.{c}" if s else c for c, _ in modules[s].named_children()]) for s in innermost]


def _is_shortcut(relative: str) -> bool:
    return any(word in part.lower() for part in relative.split(".") for word in SHORTCUT_WORDS)


def candidates(model: nn.Module, input_shape: Sequence[int]) -> list[Candidate]:
    """Every module with an image-shaped output, in registration order, from one forward of one input."""
    found: dict[str, Candidate] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, inputs: tuple, output: object, _n: str = name) -> None:
            if _n in found or not isinstance(output, torch.Tensor) or output.dim() != 4:
                return
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            found[_n] = Candidate(_n, tuple(output.shape[1:]), x.shape[-1] if x is not None and x.dim() == 4 else None)

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=_device_of(model)))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [found[n] for n in module_names(model) if n in found]


def auto_layers(model: nn.Module, input_shape: Sequence[int], min_side: int = 0) -> list[str]:
    """The paper's representation layers for any residual network (appendix C.1, Table 7).

    Per stage: the convolutions of each block's main path (the blocks' "first layers"), plus the stage's
    shortcut where it changes the resolution (a skip connection across a downsampling). On the DeepMind
    WideResNet-28-10 this is exactly Table 7's 26 layers (two shortcuts: the first stage keeps 32×32).
    Layers whose side is ``min_side`` or less (too small for the layerwise encoder's unpadded 3×3
    convolutions, Tables 8/9) are left out.
    """
    shapes = {c.name: c for c in candidates(model, input_shape)}
    stages = residual_stages(model)
    if not stages:
        raise ConfigError(
            "purifier.layers = 'auto' found no residual stages in this classifier (Sequential / "
            "ModuleList of blocks with convolutions): list the layers or patterns instead "
            "(carso info --preset P lists them)"
        )
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for _, blocks in stages:
        for block in blocks:
            for relative, module in modules[block].named_modules():
                full = f"{block}.{relative}"
                if not relative or full not in shapes:
                    continue
                if _is_shortcut(relative):
                    top = relative.split(".")[0]
                    c = shapes.get(f"{block}.{top}")
                    if relative == top and c is not None and c.in_side is not None and c.shape[-1] < c.in_side:
                        chosen.append(full)  # the stage's downsampling shortcut
                elif isinstance(module, nn.Conv2d):
                    chosen.append(full)
    layers = [n for n in chosen if min(shapes[n].shape[-2:]) > min_side]
    if not layers:
        raise ConfigError(
            f"purifier.layers = 'auto' found no layer larger than {min_side}×{min_side} "
            "(the layerwise encoder's minimum): list the layers instead"
        )
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
    handles = [modules[name].register_forward_hook(lambda *_a, _n=name: order.append(_n)) for name in layers]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=_device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
    return order


def representation_shapes(model: nn.Module, layers: Sequence[str], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
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
