"""Toy CARSOs with known answers for the evaluation's tests (issue 23): reconstruction logits given as a
function of x, no purifier, so an attack's success or failure is decided by construction."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from carso_cli import evaluation as ev
from carso_cli.evaluation import adaptive
from carso_cli.models.carso import CARSO, standard_normal_sampler

EPS = 8 / 255
SHAPE = (1, 8, 8)  # 64 pixels: a random start moves the mean pixel by ~ε/14, an ε step by ε


class ToyCARSO(CARSO):
    """A CARSO whose reconstruction logits (N, B, C) are a given function of x (no purifier).

    Its representation (what the representation attack moves) is the mean pixel, the one feature every
    toy's decision depends on: the classifier's layer ``feat``, and the condition encoder passes it on."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], aggregation: str = "dexp") -> None:
        nn.Module.__init__(self)
        self.fn = fn
        self.samples = 2
        self.aggregation = aggregation
        self.latent_sampler = standard_normal_sampler
        self.keep_reconstructions = False
        self.final_classifier = None
        self.classifier = ToyClassifier(lambda x: fn(x)[0])
        self.layers = ["feat"]
        self.purifier = nn.Module()
        self.purifier.condition_encoder = Fn(lambda rep: rep[0])

    def sample_latent(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.latent_sampler(self.samples, batch_size, 1, device, dtype)  # one latent, ignored

    def reconstruction_logits(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.fn(x)


class Fn(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class ToyClassifier(nn.Module):
    """Logits ``fn(x)`` (B, C), with the mean pixel (B, 1) as the hooked layer ``feat``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.feat = Fn(lambda x: mean_pixel(x)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + 0.0 * self.feat(x).sum()


def mean_pixel(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def toy_settings(**kw: object) -> ev.EvalSettings:
    base: dict[str, object] = {
        "attack": "adaptive",
        "targets": ["carso"],
        "n_examples": 4,
        "batch_size": 4,
        "samples": 2,
        "repeats": 2,
        "aa_steps": 5,
        "aa_eot": 1,
        "pgd_steps": 5,
        "pgd_eot": 1,
        "eps": EPS,
        "square_queries": 20,
    }
    base.update(kw)
    return ev.EvalSettings(**base)  # type: ignore[arg-type]


def run_adaptive(model: nn.Module, classifier: nn.Module, s: ev.EvalSettings, n: int = 4) -> adaptive.AdaptiveResult:
    x = torch.full((n, *SHAPE), 0.5)
    y = torch.zeros(n, dtype=torch.long)
    clean = ev.draw_flags(model, x, y, range(n), s.seed, ev.STREAM_CLEAN)[0]
    assert clean.all()
    batch = adaptive.AttackedBatch(model, model, classifier, x, y, range(n), clean, s, torch.device("cpu"))
    return adaptive.adaptive_attack(batch)
