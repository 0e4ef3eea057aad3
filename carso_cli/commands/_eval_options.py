"""The options of ``carso eval`` (its help texts), kept apart so that ``commands/evaluate.py`` reads as wiring;
the ones other commands take too (``--run``, ``--aggregation``, …) are in ``commands/_options.py``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from carso_cli.evaluation.settings import SINGLE_ATTACKS

# The evaluations, then each attack of the adaptive one alone (settings.SINGLE_ATTACKS, in their order).
Attack = Enum(  # type: ignore[misc]
    "Attack",
    [(a.replace("-", "_"), a) for a in ("adaptive", "autoattack", "pgd-eot", "none", *SINGLE_ATTACKS)],
    type=str,
)


class Target(str, Enum):
    both = "both"
    classifier = "classifier"
    carso = "carso"


class Precision(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


AttackOpt = Annotated[
    Attack | None,
    typer.Option(
        "--attack",
        help=(
            "adaptive (default when CARSO is evaluated): the per-example worst case over randAA on the paper's "
            "and the dexp-logsum surface, PGD+EoT on dexp-logsum, transfer attacks and the attacks on stochastic "
            "purification (representation, z fixed, selective EoT, targeted); autoattack: the paper's "
            "protocol, standard AA on the classifier, randAA on CARSO (section 5.1); pgd-eot: Lee & Kim 2024 "
            "(Table 14); none: clean only. Any other name runs that attack of the adaptive evaluation alone "
            "(e.g. representation, fixed-randomness, selective-eot, apgd-t-eot, pgd-cw-eot: see the README)."
        ),
    ),
]

TargetOpt = Annotated[Target, typer.Option("--target", help="Which model(s) to evaluate.")]

EpsOpt = Annotated[
    str | None,
    typer.Option("--eps", help="ℓ∞ radius: a fraction like 8/255 or a float in [0, 1] (default: the preset's)."),
]

NExamplesOpt = Annotated[int | None, typer.Option("--n-examples", help="First N test examples (default: all).")]

BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", help="Examples per batch (CARSO runs samples× as many images).")
]

SamplesOpt = Annotated[
    int | None, typer.Option("--samples", help="Reconstructions per input (default: the preset's, 8).")
]

ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", help="Continue an interrupted evaluation of the same name, skipping finished batches."),
]

RepeatsOpt = Annotated[
    int, typer.Option("--repeats", help="Re-classify each clean and adversarial example this many times (CARSO).")
]

StepsOpt = Annotated[
    int | None,
    typer.Option("--steps", help="Attack steps (default: 100 for AutoAttack, the preset's for PGD+EoT)."),
]

EotOpt = Annotated[int | None, typer.Option("--eot", help="EoT iterations (default: the preset's).")]

QueriesOpt = Annotated[int, typer.Option("--queries", help="Square attack queries in the standard AutoAttack.")]

NameOpt = Annotated[
    str | None, typer.Option("--name", help="Results go to RUN/eval/NAME (default: the attack's name).")
]

PrecisionOpt = Annotated[
    Precision,
    typer.Option("--precision", help="bfloat16 autocast for CARSO on CUDA (faster; float32 is the reference)."),
]

SaveAdversarialOpt = Annotated[
    Path | None,
    typer.Option(
        "--save-adversarial",
        help=(
            "Write every attack's adversarial examples, labels, test-set indices and per-example flags to this "
            "safetensors file."
        ),
    ),
]

AdversarialOpt = Annotated[
    Path | None,
    typer.Option(
        "--adversarial",
        help=(
            "Evaluate on the adversarial examples of this file (.safetensors, or .pt with x_adv, y, optionally "
            "idx) instead of attacking."
        ),
    ),
]

SquareOpt = Annotated[
    bool,
    typer.Option(
        "--square",
        help="Add the Square black-box attack (--queries) to --attack adaptive: on the dexp-logsum margin, and "
        "in the AutoAttack of fixed-randomness (z fixed).",
    ),
]

SaturationThresholdOpt = Annotated[
    float,
    typer.Option(
        "--saturation-threshold",
        help=(
            "Warn when more than this fraction of examples has a numerically useless CE gradient (zero, "
            "non-finite, or not the float64 direction) on an attack surface."
        ),
    ),
]

RestartsOpt = Annotated[
    int | None,
    typer.Option(
        "--restarts",
        help=(
            "PGD+EoT runs per example, the first from x, the others from random starts; the highest-loss point "
            "is kept (default: 1 for --attack pgd-eot, the paper's; 2 inside --attack adaptive)."
        ),
    ),
]

EotNormaliseOpt = Annotated[
    bool | None,
    typer.Option(
        "--eot-normalise/--no-eot-normalise",
        help=(
            "Scale each EoT draw's gradient to unit norm before averaging in PGD+EoT (default: off for --attack "
            "pgd-eot, the paper's; on inside --attack adaptive)."
        ),
    ),
]

IndicatorExamplesOpt = Annotated[
    int,
    typer.Option(
        "--indicator-examples",
        help=(
            "Attack-failure indicators of --attack adaptive (unbounded ε, convergence, EoT noise) on the first N "
            "examples."
        ),
    ),
]

NoIndicatorsOpt = Annotated[bool, typer.Option("--no-indicators", help="Skip the attack-failure indicators.")]

EpsCurveOpt = Annotated[
    str | None,
    typer.Option(
        "--eps-curve",
        help=(
            "Radii, comma-separated (fractions allowed: 2/255,4/255,8/255): the evaluation at each (RUN/eval/"
            "NAME-eps-…, resumable), then accuracy against ε in RUN/eval/NAME-curve/curve.json and curve.png."
        ),
    ),
]
