"""``carso sanity``: the checks an honest robustness claim needs, as a pass/fail checklist.

The checks themselves (what each measures, and why) are library functions in
``carso_cli/evaluation/checks.py``; this module parses the options into a ``SanitySettings`` and calls
``evaluation.sanity.run_sanity``. It exits non-zero when a check fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from carso_cli.commands._common import (
    AGGREGATION_HELP,
    Aggregation,
    DataRootOpt,
    DeviceOpt,
    RunOpt,
    SeedOpt,
    resolve_device,
)
from carso_cli.config import parse_eps
from carso_cli.evaluation.checks import CHECKS, SanitySettings, parse_checks, parse_eps_list
from carso_cli.evaluation.sanity import run_sanity
from carso_cli.evaluation.settings import run_config


def cli(
    run: RunOpt = None,
    n_examples: Annotated[int, typer.Option("--n-examples", help="First N test examples.")] = 256,
    samples: Annotated[
        int | None, typer.Option("--samples", help="Reconstructions per input (default: the preset's).")
    ] = None,
    aggregation: Annotated[
        Aggregation | None, typer.Option("--aggregation", help=AGGREGATION_HELP + " (default: the preset's).")
    ] = None,
    checks: Annotated[
        str | None, typer.Option("--checks", help=f"Comma-separated subset of: {', '.join(CHECKS)} (default: all).")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per batch.")] = 64,
    eps: Annotated[
        str | None, typer.Option("--eps", help="ε of the black-box comparison (default: the preset's).")
    ] = None,
    eps_list: Annotated[
        str, typer.Option("--eps-list", help="Increasing ε values of the monotonicity check.")
    ] = "2/255,4/255,8/255,16/255",
    large_eps: Annotated[
        str | None, typer.Option("--large-eps", help="ε of the large-ε check (default: the preset's sanity_eps, 0.95).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Short PGD+EoT steps (default: min(preset, 20)).")
    ] = None,
    eot: Annotated[
        int | None,
        typer.Option("--eot", help="EoT iterations of PGD+EoT and of the stability check (default: min(preset, 5))."),
    ] = None,
    aa_steps: Annotated[int, typer.Option("--aa-steps", help="APGD steps of the large-ε randAA.")] = 20,
    aa_eot: Annotated[
        int | None, typer.Option("--aa-eot", help="EoT iterations of the large-ε randAA (default: the preset's).")
    ] = None,
    draws: Annotated[int, typer.Option("--draws", help="Stochastic draws per example in the gradient check.")] = 4,
    queries: Annotated[int, typer.Option("--queries", help="Square attack queries.")] = 1000,
    chance_tolerance: Annotated[
        float, typer.Option("--chance-tolerance", help="Large-ε accuracy may exceed chance by this much.")
    ] = 0.05,
    max_bad_entries: Annotated[
        float, typer.Option("--max-bad-entries", help="Largest fraction of zero/non-finite gradient entries.")
    ] = 0.5,
    max_bad_gradients: Annotated[
        float, typer.Option("--max-bad-gradients", help="Largest fraction of useless gradients.")
    ] = 0.1,
    monotonic_tolerance: Annotated[
        float, typer.Option("--monotonic-tolerance", help="Allowed accuracy rise with ε, beyond noise.")
    ] = 0.05,
    min_eot_cosine: Annotated[
        float, typer.Option("--min-eot-cosine", help="Warn below this EoT-gradient agreement.")
    ] = 0.5,
    blackbox_tolerance: Annotated[
        float, typer.Option("--blackbox-tolerance", help="How much stronger a black-box attack may be, beyond noise.")
    ] = 0.05,
    saturation_threshold: Annotated[
        float,
        typer.Option(
            "--saturation-threshold",
            help=(
                "Largest fraction of examples with a numerically useless CE gradient (zero, non-finite, or not the "
                "float64 direction) on the paper's surface."
            ),
        ),
    ] = 0.1,
    eval_name: Annotated[
        str, typer.Option("--eval", help="The evaluation (RUN/eval/NAME) whose attack-failure indicators are checked.")
    ] = "adaptive",
    out: Annotated[Path | None, typer.Option("--out", help="JSON report (default: RUN/sanity.json).")] = None,
    device: DeviceOpt = None,
    seed: SeedOpt = 0,
    data_root: DataRootOpt = Path("data"),
) -> None:
    """Checks an honest robustness claim needs (large ε, gradients, ε-monotonicity, EoT, black-box,
    saturation, attack-failure indicators)."""
    from carso_cli.cli import console

    s = SanitySettings.from_options(
        run_config(run),
        checks=parse_checks(checks),
        n_examples=n_examples,
        batch_size=batch_size,
        samples=samples,
        aggregation=aggregation.value if aggregation else None,
        seed=seed,
        large_eps=None if large_eps is None else parse_eps(large_eps, "--large-eps"),
        aa_steps=aa_steps,
        aa_eot=aa_eot,
        chance_tolerance=chance_tolerance,
        draws=draws,
        max_bad_entries=max_bad_entries,
        max_bad_gradients=max_bad_gradients,
        eps=None if eps is None else parse_eps(eps, "--eps"),
        eps_list=parse_eps_list(eps_list),
        pgd_steps=steps,
        pgd_eot=eot,
        monotonic_tolerance=monotonic_tolerance,
        min_eot_cosine=min_eot_cosine,
        square_queries=queries,
        blackbox_tolerance=blackbox_tolerance,
        saturation_threshold=saturation_threshold,
        eval_name=eval_name,
    )
    report = run_sanity(run, s, device=resolve_device(device), data_root=data_root, out=out, console=console)
    if not report.passed:
        raise typer.Exit(1)
