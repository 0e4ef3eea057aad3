"""``carso sanity``: the checks an honest robustness claim needs, as a pass/fail checklist.

The checks themselves (what each measures, and why) are library functions in
``carso_cli/evaluation/checks.py``; this module parses the options into a ``SanitySettings`` and calls
``evaluation.sanity.run_sanity``. It exits non-zero when a check fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from carso_cli.commands._common import (
    AggregationOpt,
    DataRootOpt,
    DeviceOpt,
    RunOpt,
    SeedOpt,
    resolve_device,
)
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
from carso_cli.evaluation.checks import SanitySettings, parse_checks, parse_eps_list
from carso_cli.evaluation.sanity import run_sanity
from carso_cli.evaluation.settings import fields_of_options, run_config


def cli(
    run: RunOpt = None,
    n_examples: NExamplesOpt = 256,
    samples: SamplesOpt = None,
    aggregation: AggregationOpt = None,
    checks: ChecksOpt = None,
    batch_size: BatchSizeOpt = 64,
    eps: EpsOpt = None,
    eps_list: EpsListOpt = "2/255,4/255,8/255,16/255",
    large_eps: LargeEpsOpt = None,
    steps: StepsOpt = None,
    eot: EotOpt = None,
    aa_steps: AaStepsOpt = 20,
    aa_eot: AaEotOpt = None,
    draws: DrawsOpt = 4,
    queries: QueriesOpt = 1000,
    chance_tolerance: ChanceToleranceOpt = 0.05,
    max_bad_entries: MaxBadEntriesOpt = 0.5,
    max_bad_gradients: MaxBadGradientsOpt = 0.1,
    monotonic_tolerance: MonotonicToleranceOpt = 0.05,
    min_eot_cosine: MinEotCosineOpt = 0.5,
    blackbox_tolerance: BlackboxToleranceOpt = 0.05,
    saturation_threshold: SaturationThresholdOpt = 0.1,
    eval_name: EvalNameOpt = "adaptive",
    out: OutOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
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
