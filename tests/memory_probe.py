"""Run one phase of a purifier training step on the CPU and print its peak RSS growth (bytes).

Used by tests/test_memory.py in a fresh process, because a process's peak RSS never goes down:
``python tests/memory_probe.py attack|purifier N [--set key=value ...]``. A small warm-up pass first
(oneDNN primitives, thread pools), then the RSS is read and the phase runs on N examples; the output
is one JSON object: {"phase", "n", "growth"}.
"""

from __future__ import annotations

import json
import resource
import sys

import torch

from carso_cli.config import load_config, parse_override
from carso_cli.models import build_classifier, build_purifier
from carso_cli.models.representation import forward_with_representation


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(phase: str, n: int, sets: list[str]) -> None:
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

    def attack(k: int) -> None:  # one PGD/FGSM step: input gradient through the classifier
        x = images[:k].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(classifier(x), labels[:k])
        torch.autograd.grad(loss, x)

    def purify(k: int) -> None:  # representation capture, then the VAE's forward and backward
        p = purifier
        with torch.no_grad():
            _, rep = forward_with_representation(classifier, layers, images[:k], keep_graph=False)
        c = p.condition_encoder(rep)
        mu, logvar = p.joint_encoder(p.input_encoder(images[:k]), c)
        x_hat = p.decoder(mu + torch.exp(0.5 * logvar), c)
        torch.nn.functional.binary_cross_entropy(x_hat, images[:k], reduction="sum").backward()
        p.zero_grad(set_to_none=True)

    run = {"attack": attack, "purifier": purify}[phase]
    run(4)  # warm-up
    base = rss()
    run(n)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"phase": phase, "n": n, "growth": max(0, peak - base)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), [a for a in sys.argv[3:] if a != "--set"])
