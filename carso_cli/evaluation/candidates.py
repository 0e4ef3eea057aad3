"""What one attack of the adaptive evaluation produces: its candidate points, judged afterwards.

Its own module so that the attacks (``adaptive`` and ``stochastic_attacks``) can each return it without
importing one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Candidates:
    """What one attack produced on the examples it ran on: (K, b, C, H, W) points, their K sources, the
    library's verdict (randAA only: the paper's single draw), the library's warnings."""

    points: torch.Tensor
    sources: list[str]
    verdict: torch.Tensor | None = None
    warnings: list[str] = field(default_factory=list)
    library_point: torch.Tensor | None = None  # randAA: (b, C, H, W) the point of the library's verdict
