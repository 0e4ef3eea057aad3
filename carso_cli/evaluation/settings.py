"""The settings that determine the numbers: of an evaluation (``EvalSettings``, ``carso eval``) and of the
sanity checklist (``SanitySettings``, ``carso sanity``), both an ``AttackBudget`` (the fields they share,
under one set of names); and the global batches.

The preset supplies the defaults the command line leaves open (``from_options``: the one place where an
option's None becomes the preset's value); ``validate`` checks every range once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from carso_cli.aggregation import AGGREGATIONS
from carso_cli.config import Config
from carso_cli.errors import CarsoError

# The attacks of the adaptive evaluation, in the order they run (``adaptive``; the last five before Square
# are issue 20's attacks on stochastic purification, ``stochastic_attacks``). randAA runs first, on every
# example, as the paper's protocol; the others, cheap to dear, only on the examples still robust.
ADAPTIVE_ATTACKS = (
    "randaa",
    "randaa-logsum",
    "pgd-eot-logsum",
    "transfer-classifier",
    "transfer-logit",
    "representation",
    "fixed-randomness",
    "selective-eot",
    "apgd-t-eot",
    "pgd-cw-eot",
    "square",
)
# Each adaptive attack but randAA (that is ``autoattack``) also runs alone: ``--attack NAME``.
SINGLE_ATTACKS = ADAPTIVE_ATTACKS[1:]
ATTACKS = ("adaptive", "autoattack", "pgd-eot", "none", "file", *SINGLE_ATTACKS)  # "file": ``--adversarial``
TARGETS = ("classifier", "carso")

B = TypeVar("B", bound="AttackBudget")


@dataclass
class AttackBudget:
    """What eval and sanity share: the examples, CARSO's draw, and how hard the attacks try.

    The defaults are the paper's (section 5.1, Table 14): AutoAttack with 100 APGD steps and 20 EoT
    iterations, Square with 5000 queries, PGD+EoT with 200 steps of 0.007 and 20 EoT iterations.
    """

    n_examples: int | None = None  # the first N test examples; None: all of them (resolved with the dataset)
    batch_size: int = 64
    samples: int = 8  # reconstructions per input (Table 16)
    aggregation: str = "dexp"  # section 4.5
    seed: int = 0
    eps: float = 8 / 255  # ℓ∞ radius in pixel scale
    aa_steps: int = 100
    aa_eot: int = 20
    square_queries: int = 5000
    pgd_steps: int = 200
    pgd_step_size: float = 0.007
    pgd_eot: int = 20
    # Above this fraction of examples with a numerically useless CE gradient, a surface is flagged.
    saturation_threshold: float = 0.1

    @classmethod
    def preset_defaults(cls, cfg: Config) -> dict[str, Any]:
        """The values a preset gives the fields an option left open."""
        a = cfg.attacks
        return {
            "eps": a.eps,
            "samples": cfg.inference.samples,
            "aggregation": cfg.inference.aggregation,
            "aa_eot": a.randaa_eot_iterations,
            "pgd_steps": a.pgd_eot_steps,
            "pgd_step_size": a.pgd_eot_step_size,
            "pgd_eot": a.pgd_eot_iterations,
        }

    @classmethod
    def from_options(cls: type[B], cfg: Config, **options: Any) -> B:
        """The settings of these options, validated; an option given as None takes the preset's value."""
        given = {k: v for k, v in options.items() if v is not None}
        s = cls(**{**cls.preset_defaults(cfg), **given})
        s.validate()
        return s

    def validate(self) -> None:
        """Every range, once (a CarsoError naming the first value out of range)."""
        if self.n_examples is not None and self.n_examples < 1:
            raise CarsoError(f"--n-examples must be at least 1, got {self.n_examples}")
        if self.samples < 0:
            raise CarsoError(f"--samples must be ≥ 0, got {self.samples}")
        if self.aggregation not in AGGREGATIONS:
            raise CarsoError(f"unknown aggregation '{self.aggregation}' (choose from {', '.join(AGGREGATIONS)})")
        in_unit_interval(self, ("eps", "saturation_threshold"))
        at_least_one(self, ("batch_size", "aa_steps", "aa_eot", "square_queries", "pgd_steps", "pgd_eot"))

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # exactly what a file round-trip gives


def at_least_one(settings: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(settings, name) < 1:
            raise CarsoError(f"{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")


def in_unit_interval(settings: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if not 0.0 <= getattr(settings, name) <= 1.0:
            raise CarsoError(f"{name.replace('_', ' ')} must lie in [0, 1], got {getattr(settings, name)}")


@dataclass
class EvalSettings(AttackBudget):
    """Everything that determines the numbers of an evaluation (stored with every batch)."""

    attack: str = "autoattack"
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    repeats: int = 10
    # PGD+EoT beyond the paper (issue 23): random restarts (the first run starts at x, as the paper's),
    # each draw's gradient normalised before averaging, the best iterate kept. None: the attack's default
    # — the paper's PGD+EoT for ``pgd-eot`` (1, off; last iterate), the stronger one inside ``adaptive``
    # (2 restarts, normalised; best iterate always).
    restarts: int | None = None
    eot_normalise: bool | None = None
    # The adaptive evaluation (``adaptive``): Square among its attacks.
    square: bool = False
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
            self.restarts = 2 if self.is_adaptive else 1
        if self.eot_normalise is None:
            self.eot_normalise = self.is_adaptive

    @property
    def adaptive_attacks(self) -> list[str]:
        """The adaptive attacks this evaluation runs, in order: all (Square with ``square``) for
        ``adaptive``, the one named for a single attack (``--attack NAME``), none otherwise."""
        if self.attack == "adaptive":
            return [a for a in ADAPTIVE_ATTACKS if a != "square" or self.square]
        return [self.attack] if self.attack in SINGLE_ATTACKS else []

    @property
    def is_adaptive(self) -> bool:
        """Attacked by the adaptive machinery (every candidate judged by the evaluated model, C/adaptive,
        the indicators): ``adaptive`` or one of its attacks alone."""
        return bool(self.adaptive_attacks)

    @classmethod
    def preset_defaults(cls, cfg: Config) -> dict[str, Any]:
        return {**super().preset_defaults(cfg), "dataset": cfg.data.dataset}

    @classmethod
    def from_options(cls, cfg: Config, **options: Any) -> EvalSettings:  # type: ignore[override]
        """As ``AttackBudget.from_options``; ``attack`` None: ``default_attack(targets)``. The indicators
        judge the adaptive attacks (all, or one alone): off for any other."""
        targets = options.get("targets") or list(TARGETS)
        attack = options.get("attack") or default_attack(targets)
        indicators = options.get("indicators", True) and (attack == "adaptive" or attack in SINGLE_ATTACKS)
        return super().from_options(cfg, **{**options, "attack": attack, "indicators": indicators})

    def pgd_eot_options(self) -> dict[str, Any]:
        """``gradients.pgd_eot_examples``'s keyword arguments for CARSO's PGD+EoT (Table 14, issue 23)."""
        return {
            "eps": self.eps,
            "steps": self.pgd_steps,
            "step_size": self.pgd_step_size,
            "eot": self.pgd_eot,
            "seed": self.seed,
            "restarts": int(self.restarts or 1),
            "normalise": bool(self.eot_normalise),
        }

    def validate(self) -> None:
        if self.attack not in ATTACKS:
            raise CarsoError(f"unknown attack '{self.attack}' (choose from {', '.join(ATTACKS)})")
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise CarsoError(f"targets must be among {', '.join(TARGETS)}, got {self.targets}")
        if self.attack in SINGLE_ATTACKS and "carso" not in self.targets:
            raise CarsoError(
                f"--attack {self.attack} is an attack of the adaptive evaluation on CARSO: it needs --target carso "
                "or both (the classifier alone: --attack autoattack or pgd-eot)"
            )
        if self.square and self.attack not in ("adaptive", "fixed-randomness"):
            raise CarsoError(
                "--square adds the Square attack to --attack adaptive (and to fixed-randomness); it has no effect "
                f"with --attack {self.attack}"
            )
        super().validate()
        at_least_one(self, ("repeats", "restarts", "indicator_examples"))
        if self.precision not in ("float32", "bfloat16"):
            raise CarsoError(f"precision must be float32 or bfloat16, got {self.precision}")


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """Global batches: contiguous ranges of ``batch_size`` examples (the last one shorter)."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def default_attack(targets: list[str]) -> str:
    """The adaptive evaluation whenever CARSO is evaluated (issue 8); the paper's AutoAttack otherwise."""
    return "adaptive" if "carso" in targets else "autoattack"


def targets_of(target: str) -> list[str]:
    """``--target``: "both" → every target (the classifier, then CARSO), else that one."""
    return list(TARGETS) if target == "both" else [target]


def run_config(run: Path | str | None) -> Config:
    """The resolved preset a run directory keeps (``config.toml``): where the options' defaults come from."""
    from carso_cli import checkpoint as ckpt
    from carso_cli.config import load_config

    return load_config(ckpt.resolve_run(run) / ckpt.CONFIG_FILE)


def fields_of_options(cls: type, options: dict[str, Any], renamed: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """A command's parsed options as ``cls``'s fields (for ``from_options``): enums to their values, an option
    named otherwise to its field(s) (``renamed``, e.g. ``--steps`` → ``aa_steps``, ``pgd_steps``), the options
    that are no field (``--run``, ``--device``, …) left out. A new option named as its field needs nothing here."""
    names = {f.name for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in options.items():
        for name in renamed.get(key, (key,)):
            if name in names:
                out[name] = value.value if isinstance(value, Enum) else value
    return out
