"""``carso sanity``: the checks an honest robustness claim needs, as a pass/fail checklist.

The checks themselves (what each measures, and why) are library functions in
``carso_cli/evaluation/checks.py``; this module parses the options into a ``SanitySettings`` and calls
``evaluation.sanity.run_sanity``. It exits non-zero when a check fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from carso_cli.commands._common import resolve_device
from carso_cli.commands._options import AggregationOpt, DataRootOpt, DeviceOpt, RunOpt, SeedOpt
from carso_cli.commands._sanity_options import (
    AaEotOpt,
    AaStepsOpt,
    BatchSizeOpt,
    BlackboxToleranceOpt,
    ChanceToleranceOpt,
    ChecksOpt,
    DrawsOpt,
    EotOpt,
    EpsListOpt,
    EpsOpt,
    EvalNameOpt,
    LargeEpsOpt,
    MaxBadEntriesOpt,
    MaxBadGradientsOpt,
    MinEotCosineOpt,
    MonotonicToleranceOpt,
    NExamplesOpt,
    OutOpt,
    QueriesOpt,
    SamplesOpt,
    SaturationThresholdOpt,
    StepsOpt,
)
from carso_cli.config import parse_eps
from carso_cli.evaluation.checks import EPS_LIST, SanitySettings, parse_checks, parse_eps_list
from carso_cli.evaluation.sanity import run_sanity
from carso_cli.evaluation.settings import fields_of_options, run_config

S = SanitySettings  # the defaults the options show are the settings' own


def cli(
    run: RunOpt = None,
    n_examples: NExamplesOpt = S.n_examples,
    samples: SamplesOpt = None,
    aggregation: AggregationOpt = None,
    checks: ChecksOpt = None,
    batch_size: BatchSizeOpt = S.batch_size,
    eps: EpsOpt = None,
    eps_list: EpsListOpt = EPS_LIST,
    large_eps: LargeEpsOpt = None,
    steps: StepsOpt = None,
    eot: EotOpt = None,
    aa_steps: AaStepsOpt = S.aa_steps,
    aa_eot: AaEotOpt = None,
    draws: DrawsOpt = S.draws,
    queries: QueriesOpt = S.square_queries,
    chance_tolerance: ChanceToleranceOpt = S.chance_tolerance,
    max_bad_entries: MaxBadEntriesOpt = S.max_bad_entries,
    max_bad_gradients: MaxBadGradientsOpt = S.max_bad_gradients,
    monotonic_tolerance: MonotonicToleranceOpt = S.monotonic_tolerance,
    min_eot_cosine: MinEotCosineOpt = S.min_eot_cosine,
    blackbox_tolerance: BlackboxToleranceOpt = S.blackbox_tolerance,
    saturation_threshold: SaturationThresholdOpt = S.saturation_threshold,
    eval_name: EvalNameOpt = S.eval_name,
    out: OutOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = S.seed,
    data_root: DataRootOpt = Path("data"),
) -> None:
    """Checks an honest robustness claim needs (large ε, gradients, ε-monotonicity, EoT, black-box,
    saturation, attack-failure indicators)."""
    options = dict(locals())
    from carso_cli.cli import console

    s = settings_of(options)

    report = run_sanity(run, s, device=resolve_device(device), data_root=data_root, out=out, console=console)
    if not report.passed:
        raise typer.Exit(1)


def settings_of(o: dict[str, Any]) -> SanitySettings:
    """The parsed options as ``SanitySettings`` (ε values and lists parsed; None: the run's preset)."""
    values = fields_of_options(SanitySettings, o, RENAMED)
    values["checks"] = parse_checks(o["checks"])
    values["eps_list"] = parse_eps_list(o["eps_list"])
    for key, option in (("eps", "--eps"), ("large_eps", "--large-eps")):
        values[key] = None if o[key] is None else parse_eps(o[key], option)
    return SanitySettings.from_options(run_config(o["run"]), **values)


# The options named otherwise than their fields (AttackBudget's names, shared with eval).
RENAMED = {"steps": ("pgd_steps",), "eot": ("pgd_eot",), "queries": ("square_queries",)}
