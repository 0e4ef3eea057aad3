"""Gradient-saturation diagnostics: where the cross-entropy gradient of an attack surface is useless.

The paper's aggregation P = softmax(Σ_α exp l_α) (section 4.5) is so peaked that for a confidently
classified example the cross-entropy's input gradient is exactly 0 in float32: APGD-CE and PGD+EoT
then cannot move, and the example looks robust without being so. ``dexp-logsum`` exposes the same
decision on the scale of the logits. For each surface we count the examples whose CE input gradient
(one seeded draw) is entirely zero or has a non-finite entry, at the clean point and at the final
adversarial point; a surface above the threshold is flagged (yellow in the table, ``saturation`` in
results.json, and a failure of ``carso sanity`` when the paper's surface is saturated and
``dexp-logsum`` is not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from carso_cli.evaluation.gradients import input_gradient
from carso_cli.evaluation.seeding import (
    STREAM_GRADIENTS,
    ExampleSeededSampler,
    find_carso,
    seeded_latents,
)

PAPER_SURFACE = "dexp"
LOGSUM_SURFACE = "dexp-logsum"
SURFACES = (PAPER_SURFACE, LOGSUM_SURFACE)
POINTS = ("clean", "adversarial")


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
    """The surfaces diagnosed for a model aggregating with ``aggregation``: its own, the paper's, logsum."""
    return list(dict.fromkeys([aggregation, *SURFACES]))


def saturated_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *,
                    seed: int) -> torch.Tensor:
    """(B,) bool: the CE input gradient of one seeded draw is entirely zero or has a non-finite entry."""
    sampler = ExampleSeededSampler(seed, STREAM_GRADIENTS).bind(indices)
    with seeded_latents(model, sampler):
        g = input_gradient(model, x, y, "ce").flatten(1)
    return ((g == 0).all(dim=1) | ~torch.isfinite(g).all(dim=1)).cpu()


def flag_key(name: str, point: str) -> str:
    return f"saturation_{name}_{point}"


def saturation_summary(flags: dict[str, list[Any]], threshold: float) -> dict[str, Any] | None:
    """Per surface and point: saturated count and fraction; the surfaces above ``threshold``."""
    out: dict[str, Any] = {}
    for key, v in flags.items():
        if not key.startswith("saturation_"):
            continue
        name, point = key[len("saturation_"):].rsplit("_", 1)
        entry = out.setdefault(name, {})
        entry[point] = {"saturated": int(sum(v)), "total": len(v), "fraction": sum(v) / max(len(v), 1)}
    if not out:
        return None
    flagged = sorted(name for name, e in out.items() if max(p["fraction"] for p in e.values()) > threshold)
    return {"surfaces": out, "threshold": threshold, "flagged": flagged,
            "meaning": "fraction of examples whose CE input gradient (one draw) is entirely zero or non-finite"}
