"""Run each phase of a purifier training step on the CPU and print how far the RSS peak rose (bytes).

Used by tests/test_memory.py in a fresh process: ``python tests/memory_probe.py N [--set key=value ...]``.
A small warm-up pass first (oneDNN primitives, thread pools); then, per phase, the peak is reset
(``memory.reset_peak``: Linux's VmHWM), the phase runs on N examples, and the rise of the peak over
the RSS before it is the phase's memory. Prints one JSON object {"attack": bytes, "purifier": bytes}.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys

import torch

from carso_cli import memory
from carso_cli.config import load_config, parse_override
from carso_cli.models import build_classifier, build_purifier
from carso_cli.models.representation import forward_with_representation

CPU = torch.device("cpu")


def _trim() -> None:
    """Hand the C heap's free memory back (glibc keeps freed blocks resident, and the next phase would
    reuse them unseen by the RSS)."""
    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def main(n: int, sets: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = load_config("smoke", dict(parse_override(s) for s in sets))
    torch.manual_seed(0)
    classifier = build_classifier(cfg).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    purifier = build_purifier(cfg, classifier).train()
    layers = list(purifier.spec.layers)
    size = cfg.data.image_size
    images = torch.rand(n, cfg.data.channels, size, size)
    labels = torch.zeros(n, dtype=torch.long)

    def attack(k: int) -> None:  # one PGD/FGSM step: the input gradient through the classifier
        x = images[:k].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(classifier(x), labels[:k])
        torch.autograd.grad(loss, x)

    def purify(k: int) -> None:  # the representation's capture, then the VAE's forward and backward
        p = purifier
        with torch.no_grad():
            _, rep = forward_with_representation(classifier, layers, images[:k], keep_graph=False)
        c = p.condition_encoder(rep)
        mu, logvar = p.joint_encoder(p.input_encoder(images[:k]), c)
        x_hat = p.decoder(mu + torch.exp(0.5 * logvar), c)
        torch.nn.functional.binary_cross_entropy(x_hat, images[:k], reduction="sum").backward()
        p.zero_grad(set_to_none=True)

    out = {}
    for name, phase in (("attack", attack), ("purifier", purify)):
        phase(4)  # warm-up
        _trim()
        if not memory.reset_peak(CPU):
            print(json.dumps({"skip": "the RSS peak cannot be reset here (/proc/self/clear_refs)"}))
            return
        base = memory.current_rss()
        phase(n)
        out[name] = max(0, memory.peak_bytes(CPU) - base)
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]), [a for a in sys.argv[2:] if a != "--set"])
