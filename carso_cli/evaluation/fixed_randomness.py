"""Fixed randomness: standard AutoAttack on CARSO with its latent draws held fixed (issue 20).

Liu et al. (ICLR 2025) attack stochastic purification with the randomness held fixed ("deterministic
white-box") and find that most of the claimed robustness came from the stochasticity: EoT with few
draws estimates a noisy gradient, while with common random numbers (the same z at every step) the
model is a deterministic function that AutoAttack's components optimise as on any classifier. Two
choices of z: ``z0`` (every draw z = 0, the prior's mean: the purifier's "typical" reconstruction,
free of the latent noise) and ``crn`` (one seeded draw of N latents, the same at every step).

The same z is given to every example of the batch and every row subset the library forwards (Square
and FAB attack subsets of rows): a sampler keyed by example cannot follow those subsets, and sharing
one realisation across examples changes nothing for any single example. On that deterministic model,
on the ``dexp-logsum`` surface (the paper's decision, unsaturated), each component runs once on every
example: APGD-CE, APGD-T and FAB-T (the ``N_TARGETS`` highest non-true classes; per example the
target whose point has the largest margin on the fixed model), Square. The points are candidates,
judged afterwards by the model as evaluated on fresh draws: a break of the fixed model that does not
survive fresh draws counts nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from carso_cli.evaluation.ascent import MIN_CLASSES_TARGETED, N_TARGETS, margin, project, top_targets
from carso_cli.evaluation.autoattack import make_autoattack
from carso_cli.evaluation.saturation import LOGSUM_SURFACE, surface
from carso_cli.evaluation.seeding import example_seed, seed_everything, seeded_latents
from carso_cli.evaluation.settings import EvalSettings

MODES = ("z0", "crn")
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")


class FixedLatents:
    """A ``CARSO.latent_sampler`` that returns the same z at every call, for any batch: zeros (``z0``)
    or one seeded draw (``crn``, from numpy's Philox keyed by (seed, "crn", n, d))."""

    def __init__(self, mode: str, seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown fixed-randomness mode '{mode}' (choose from {', '.join(MODES)})")
        self.mode = mode
        self.seed = seed
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, n: int, b: int, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.mode == "z0":
            return torch.zeros(n, b, d, device=device, dtype=dtype)
        if (n, d) not in self.cache:
            g = np.random.Generator(np.random.Philox(key=example_seed(self.seed, "crn", n, d, bits=128)))
            self.cache[(n, d)] = torch.from_numpy(g.standard_normal((n, 1, d), dtype=np.float32))
        return self.cache[(n, d)].to(device, dtype).expand(n, b, d)


@torch.no_grad()
def _largest_margin(model: nn.Module, points: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example the candidate (of K) with the largest margin on the (deterministic) model. (K, B, …) → (B, …)."""
    m = torch.stack([margin(model(p).double(), y) for p in points])  # (K, B)
    return points[m.argmax(dim=0), torch.arange(points.shape[1], device=points.device)]


def component_points(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: EvalSettings, *, seed: int, device: torch.device
) -> tuple[torch.Tensor, list[str]]:
    """AutoAttack's standard components on a deterministic ``model``, each once on every example.
    (K, B, C, H, W), one point per component, and the K component names."""
    # Square, the dear black-box component, follows --square, as the adaptive evaluation's own Square.
    components = [c for c in COMPONENTS if c != "square" or s.square]
    aa = make_autoattack(
        model,
        eps=s.eps,
        version="custom",
        attacks=components,
        seed=seed,
        device=device,
        steps=s.aa_steps,
        square_queries=s.square_queries,
    )
    xf, yf = x.detach().float().to(device), y.detach().long().to(device)
    with torch.no_grad():
        scores = model(xf)
    targets = top_targets(scores, yf, N_TARGETS)
    points = []
    for name in components:
        if name == "apgd-t" and scores.shape[1] < MIN_CLASSES_TARGETED:
            point = xf  # the targeted DLR loss needs 4 classes: nothing to run (the input as candidate)
        elif name == "apgd-ce":
            aa.apgd.loss = "ce"
            point = _apgd(aa.apgd, xf, yf, seed)
        elif name == "apgd-t":
            tried = []
            for t in targets:
                aa.apgd_targeted.y_target = t
                tried.append(_apgd(aa.apgd_targeted, xf, yf, seed))
            point = _largest_margin(model, torch.stack(tried), yf)
        elif name == "fab-t":
            tried = []
            for k in range(targets.shape[0]):
                aa.fab.target_class = k + 2  # FAB-T's own rule: the (k+2)-th highest score
                seed_everything(seed)
                adv = aa.fab.attack_single_run(xf, yf, use_rand_start=False, is_targeted=True)
                tried.append(project(adv, xf, s.eps))  # FAB minimises the norm: its point may lie beyond ε
            point = _largest_margin(model, torch.stack(tried), yf) if tried else xf
        elif name == "square":
            aa.square.seed = seed
            aa.square.init_hyperparam(xf)
            seed_everything(seed)
            _, point = aa.square.attack_single_run(xf, yf)
        else:
            raise ValueError(f"unknown component '{name}' (choose from {', '.join(COMPONENTS)})")
        points.append(point.detach().to(x.device, x.dtype))
    return torch.stack(points), list(components)


def _apgd(apgd, xf: torch.Tensor, yf: torch.Tensor, seed: int) -> torch.Tensor:
    apgd.seed = seed
    apgd.init_hyperparam(xf)
    seed_everything(seed)
    x_best, acc, _, x_best_adv = apgd.attack_single_run(xf, yf)
    return torch.where((acc == 0).view(-1, *[1] * (xf.dim() - 1)), x_best_adv, x_best)


def fixed_randomness_points(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    s: EvalSettings,
    *,
    seed: int,
    device: torch.device,
    modes: Sequence[str] = MODES,
) -> tuple[torch.Tensor, list[str]]:
    """Candidates (K, B, C, H, W), sources "MODE/COMPONENT": every component on CARSO with z fixed."""
    points, sources = [], []
    for mode in modes:
        with seeded_latents(model, FixedLatents(mode, seed)), surface(model, LOGSUM_SURFACE):
            p, names = component_points(model, x, y, s, seed=seed, device=device)
        points.append(p)
        sources += [f"{mode}/{n}" for n in names]
    return torch.cat(points), sources
