"""Gradient-saturation diagnostics: where the cross-entropy gradient of an attack surface is useless.

The paper's aggregation P = softmax(Σ_α exp l_α) (section 4.5) is so peaked that for a confidently
classified example the cross-entropy's input gradient is 0, or non-zero but numerically meaningless, in
float32; on the authors' own float32 surface (``dexp-authors``) it is NaN. APGD-CE and PGD+EoT then
cannot move, and the example looks robust without being so. ``dexp-logsum`` exposes the same decision
on the scale of the logits.

"Numerically useless" (issue 23): a gradient (one example, one seeded draw) is useless when it has a
non-finite entry, is entirely zero, or points elsewhere than the same gradient with the aggregation and
the loss recomputed in float64 (same z, same reconstruction logits, same network Jacobian): cosine
below ``AGREEMENT`` (0.5). Why this measure: a sign
step needs the direction, not the size, so a norm threshold (e.g. against the logsum surface, whose
scale differs from the log-odds' by ~e^l by construction) would flag healthy tiny gradients and miss
wrong large ones; float64 shows exactly what float32 rounding destroyed (e.g. p_y = 1 − e⁻²³ rounding
to 1 drops the label's term and flips the sign). A gradient that float64 also computes as exactly 0
counts as useless too (zero is useless to a sign step, whatever the mathematics says). Per example the
code is 0 (healthy), 1 (useless, finite) or 2 (non-finite: NaN or inf); a surface above the threshold is
flagged (yellow in the table, ``saturation`` in results.json, and a failure of ``carso sanity`` when the
paper's surface is saturated and ``dexp-logsum`` is not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from carso_cli.aggregation import aggregate
from carso_cli.evaluation.seeding import (
    STREAM_GRADIENTS,
    ExampleSeededSampler,
    find_carso,
    seeded_latents,
)

PAPER_SURFACE = "dexp"
AUTHORS_SURFACE = "dexp-authors"
LOGSUM_SURFACE = "dexp-logsum"
SURFACES = (PAPER_SURFACE, LOGSUM_SURFACE)
HEALTHY, USELESS, NONFINITE = 0, 1, 2
AGREEMENT = 0.5  # cosine with the float64 gradient below which a float32 gradient is useless


def paper_surface(aggregation: str) -> str:
    """The surface the paper's protocol attacks: the authors' float32 lexsemble for the paper's
    aggregation (what their CARSOWrap returned to AutoAttack), else the model's own."""
    return AUTHORS_SURFACE if aggregation == PAPER_SURFACE else aggregation


@contextlib.contextmanager
def surface(model: nn.Module, aggregation: str) -> Iterator[None]:
    """Expose the CARSO inside ``model`` to attacks through another aggregation (its scores); restore on exit.

    Only the attacked scores change: the decision of every surface used here is judged afterwards
    with the model's own aggregation.
    """
    carso = find_carso(model)
    if carso is None:
        yield
        return
    old = carso.aggregation
    carso.aggregation = aggregation
    try:
        yield
    finally:
        carso.aggregation = old


def surfaces_of(aggregation: str) -> list[str]:
    """The surfaces diagnosed for a model aggregating with ``aggregation``: its own, the paper's, logsum,
    and the one the paper's protocol attacks (the authors' for ``dexp``)."""
    return list(dict.fromkeys([aggregation, *SURFACES, paper_surface(aggregation)]))


def saturated_flags(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *, seed: int
) -> torch.Tensor:
    """(B,) int8 codes of the CE input gradient of one seeded draw: 0 healthy, 1 useless, 2 non-finite.

    The float32 gradient (what an attack gets) is compared with the one whose aggregation and loss are
    recomputed in float64 from the same reconstruction logits (same z) and pulled back through the same
    network (``gradient_pair``).
    """
    sampler = ExampleSeededSampler(seed, STREAM_GRADIENTS).bind(indices)
    with seeded_latents(model, sampler):
        g, g64 = gradient_pair(model, x, y)
    g, g64 = g.flatten(1), g64.flatten(1)
    nonfinite = ~torch.isfinite(g).all(dim=1)
    cos = torch.nn.functional.cosine_similarity(g.double(), g64.double(), dim=1, eps=1e-300)
    useless = (g == 0).all(dim=1) | (g64 == 0).all(dim=1) | ~(cos >= AGREEMENT)
    codes = torch.where(nonfinite, NONFINITE, torch.where(useless, USELESS, HEALTHY))
    return codes.to(torch.int8).cpu()


def gradient_pair(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∇ₓ Σ CE(scores, y) as computed (float32 network, the aggregation's own dtype) and its reference:
    the same with the aggregation and the loss in float64. Both (B, C, H, W).

    The network's Jacobian is the float32 one in both (saturation is a property of the surface, the
    aggregation and the loss, not of the network, and a float64 copy of a large model would cost more
    than the attack). The reference's logit gradient is rescaled per example before the pull-back so
    that float32 does not underflow it; that changes its length, not its direction. For a model that
    is not a CARSO the "aggregation" is the identity on its logits.
    """
    carso = find_carso(model)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if carso is not None:
            logits = carso.reconstruction_logits(x)  # (N, B, C)
            aggregation = carso.aggregation

            def head(lg: torch.Tensor) -> torch.Tensor:
                return aggregate(lg, aggregation)
        else:
            logits = model(x)[None]

            def head(lg: torch.Tensor) -> torch.Tensor:
                return lg[0]

        scores = head(logits)
        scores = scores if scores.dtype == torch.float64 else scores.float()
        (d32,) = torch.autograd.grad(F.cross_entropy(scores, y, reduction="sum"), logits, retain_graph=True)
        l64 = logits.detach().double().requires_grad_(True)
        (d64,) = torch.autograd.grad(F.cross_entropy(head(l64), y, reduction="sum"), l64)
        scale = d64.abs().amax(dim=(0, 2), keepdim=True)
        d64 = torch.where(scale > 0, d64 / scale.clamp_min(1e-300), d64)
        (g,) = torch.autograd.grad(logits, x, d32.to(logits.dtype), retain_graph=True)
        (g64,) = torch.autograd.grad(logits, x, d64.to(logits.dtype))
    return g.detach(), g64.detach()


def flag_key(name: str, point: str) -> str:
    return f"saturation_{name}_{point}"


def saturation_summary(flags: dict[str, list[Any]], threshold: float) -> dict[str, Any] | None:
    """Per surface and point: useless (codes 1 or 2) and non-finite (2) counts and the useless fraction;
    the surfaces above ``threshold``."""
    out: dict[str, Any] = {}
    for key, v in flags.items():
        if not key.startswith("saturation_"):
            continue
        name, point = key[len("saturation_") :].rsplit("_", 1)
        entry = out.setdefault(name, {})
        useless = sum(1 for f in v if f)
        entry[point] = {
            "saturated": useless,
            "nonfinite": sum(1 for f in v if f == NONFINITE),
            "total": len(v),
            "fraction": useless / max(len(v), 1),
        }
    if not out:
        return None
    flagged = sorted(name for name, e in out.items() if max(p["fraction"] for p in e.values()) > threshold)
    return {
        "surfaces": out,
        "threshold": threshold,
        "flagged": flagged,
        "meaning": "fraction of examples whose CE input gradient (one draw) is numerically useless: "
        "non-finite, zero, or at cosine < 0.5 with its float64 recomputation; "
        "nonfinite counts the NaN/inf ones",
    }
