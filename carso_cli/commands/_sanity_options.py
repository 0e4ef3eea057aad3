"""The options of ``carso sanity`` (its help texts), kept apart so that ``commands/sanity.py`` reads as wiring;
the ones other commands take too (``--run``, ``--aggregation``, …) are in ``commands/_options.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from carso_cli.evaluation.checks import CHECKS

NExamplesOpt = Annotated[int, typer.Option("--n-examples", help="First N test examples.")]

SamplesOpt = Annotated[int | None, typer.Option("--samples", help="Reconstructions per input (default: the preset's).")]

ChecksOpt = Annotated[
    str | None, typer.Option("--checks", help=f"Comma-separated subset of: {', '.join(CHECKS)} (default: all).")
]

BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Examples per batch.")]

EpsOpt = Annotated[str | None, typer.Option("--eps", help="ε of the black-box comparison (default: the preset's).")]

EpsListOpt = Annotated[str, typer.Option("--eps-list", help="Increasing ε values of the monotonicity check.")]

LargeEpsOpt = Annotated[
    str | None, typer.Option("--large-eps", help="ε of the large-ε check (default: the preset's sanity_eps, 0.95).")
]

StepsOpt = Annotated[int | None, typer.Option("--steps", help="Short PGD+EoT steps (default: min(preset, 20)).")]

EotOpt = Annotated[
    int | None,
    typer.Option("--eot", help="EoT iterations of PGD+EoT and of the stability check (default: min(preset, 5))."),
]

AaStepsOpt = Annotated[int, typer.Option("--aa-steps", help="APGD steps of the large-ε randAA.")]

AaEotOpt = Annotated[
    int | None, typer.Option("--aa-eot", help="EoT iterations of the large-ε randAA (default: the preset's).")
]

DrawsOpt = Annotated[int, typer.Option("--draws", help="Stochastic draws per example in the gradient check.")]

QueriesOpt = Annotated[int, typer.Option("--queries", help="Square attack queries.")]

ChanceToleranceOpt = Annotated[
    float, typer.Option("--chance-tolerance", help="Large-ε accuracy may exceed chance by this much.")
]

MaxBadEntriesOpt = Annotated[
    float, typer.Option("--max-bad-entries", help="Largest fraction of zero/non-finite gradient entries.")
]

MaxBadGradientsOpt = Annotated[
    float, typer.Option("--max-bad-gradients", help="Largest fraction of useless gradients.")
]

MonotonicToleranceOpt = Annotated[
    float, typer.Option("--monotonic-tolerance", help="Allowed accuracy rise with ε, beyond noise.")
]

MinEotCosineOpt = Annotated[float, typer.Option("--min-eot-cosine", help="Warn below this EoT-gradient agreement.")]

BlackboxToleranceOpt = Annotated[
    float, typer.Option("--blackbox-tolerance", help="How much stronger a black-box attack may be, beyond noise.")
]

SaturationThresholdOpt = Annotated[
    float,
    typer.Option(
        "--saturation-threshold",
        help=(
            "Largest fraction of examples with a numerically useless CE gradient (zero, non-finite, or not the "
            "float64 direction) on the paper's surface."
        ),
    ),
]

EvalNameOpt = Annotated[
    str, typer.Option("--eval", help="The evaluation (RUN/eval/NAME) whose attack-failure indicators are checked.")
]

OutOpt = Annotated[Path | None, typer.Option("--out", help="JSON report (default: RUN/sanity.json).")]
