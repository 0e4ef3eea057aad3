"""The settings that determine an evaluation's numbers, and the global batches."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from carso_cli.errors import CarsoError

ATTACKS = ("adaptive", "autoattack", "pgd-eot", "none")
TARGETS = ("classifier", "carso")


@dataclass
class EvalSettings:
    """Everything that determines the numbers of an evaluation (stored with every batch)."""

    attack: str = "autoattack"
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    eps: float = 8 / 255
    n_examples: int = 0
    batch_size: int = 64
    samples: int = 8
    aggregation: str = "dexp"
    seed: int = 0
    repeats: int = 10
    # AutoAttack (section 5.1): 100 APGD steps, 20 EoT iterations for the rand version, Square 5000 queries.
    aa_steps: int = 100
    aa_eot: int = 20
    square_queries: int = 5000
    # PGD+EoT (Table 14): 200 steps of 0.007, 20 EoT iterations.
    pgd_steps: int = 200
    pgd_step_size: float = 0.007
    pgd_eot: int = 20
    # PGD+EoT beyond the paper (issue 23): random restarts (the first run starts at x, as the paper's),
    # each draw's gradient normalised before averaging, the best iterate kept. None: the attack's default
    # — the paper's PGD+EoT for ``pgd-eot`` (1, off; last iterate), the stronger one inside ``adaptive``
    # (2 restarts, normalised; best iterate always).
    restarts: int | None = None
    eot_normalise: bool | None = None
    # The adaptive evaluation (``adaptive``): Square among its attacks; the saturation warning level.
    square: bool = False
    saturation_threshold: float = 0.1
    # Attack-failure indicators (``indicators``) of the adaptive evaluation, on its first N examples.
    indicators: bool = True
    indicator_examples: int = 8
    precision: str = "float32"
    dataset: str = ""
    split: str = "test"
    classifier_sha256: str = ""
    purifier_sha256: str = ""

    def __post_init__(self) -> None:
        if self.restarts is None:
            self.restarts = 2 if self.attack == "adaptive" else 1
        if self.eot_normalise is None:
            self.eot_normalise = self.attack == "adaptive"

    def validate(self) -> None:
        if self.attack not in ATTACKS:
            raise CarsoError(f"unknown attack '{self.attack}' (choose from {', '.join(ATTACKS)})")
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise CarsoError(f"targets must be among {', '.join(TARGETS)}, got {self.targets}")
        if not 0.0 <= self.eps <= 1.0:
            raise CarsoError(f"eps must lie in [0, 1], got {self.eps}")
        for name in ("batch_size", "repeats", "aa_steps", "aa_eot", "pgd_steps", "pgd_eot", "restarts"):
            if getattr(self, name) < 1:
                raise CarsoError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.square_queries < 1:
            raise CarsoError(f"square queries must be at least 1, got {self.square_queries}")
        if not 0.0 <= self.saturation_threshold <= 1.0:
            raise CarsoError(f"saturation threshold must lie in [0, 1], got {self.saturation_threshold}")
        if self.indicator_examples < 1:
            raise CarsoError(f"indicator examples must be at least 1, got {self.indicator_examples}")
        if self.precision not in ("float32", "bfloat16"):
            raise CarsoError(f"precision must be float32 or bfloat16, got {self.precision}")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # exactly what a file round-trip gives


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """Global batches: contiguous ranges of ``batch_size`` examples (the last one shorter)."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
