"""``carso eval``: clean and robust accuracy of the classifier and of CARSO (the paper's Table 2).

The classifier alone is attacked by the standard AutoAttack, CARSO end-to-end by the randomized one
(APGD-CE + APGD-DLR with EoT), both through pyautoattack (section 5.1); ``--attack pgd-eot`` runs the
PGD+EoT pipeline of Lee & Kim 2024 instead (Table 14). Whenever CARSO is evaluated the default is
``--attack adaptive``: the paper's randAA plus attacks through other surfaces and transfers, with the
per-example worst case (C/adaptive, issue 8); ``--attack autoattack`` is the paper's protocol alone.
This module parses the options into an ``EvalSettings`` and an ``EvalJob``; ``evaluation.run_evaluation``
does the rest (seeding, resume, sharding, the tables: the package ``carso_cli/evaluation/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from carso_cli import distributed
from carso_cli import evaluation as ev
from carso_cli.commands._common import resolve_device
from carso_cli.commands._eval_options import (
    AdversarialOpt,
    AttackOpt,
    BatchSizeOpt,
    EotNormaliseOpt,
    EotOpt,
    EpsCurveOpt,
    EpsOpt,
    IndicatorExamplesOpt,
    NameOpt,
    NExamplesOpt,
    NoIndicatorsOpt,
    Precision,
    PrecisionOpt,
    QueriesOpt,
    RepeatsOpt,
    RestartsOpt,
    ResumeOpt,
    SamplesOpt,
    SaturationThresholdOpt,
    SaveAdversarialOpt,
    SquareOpt,
    StepsOpt,
    Target,
    TargetOpt,
)
from carso_cli.commands._options import AggregationOpt, DataRootOpt, DeviceOpt, GpusOpt, RunOpt, SeedOpt
from carso_cli.config import parse_eps
from carso_cli.errors import CarsoError
from carso_cli.evaluation import curve

S = ev.EvalSettings  # the defaults the options show are the settings' own


def cli(
    ctx: typer.Context,
    run: RunOpt = None,
    attack: AttackOpt = None,
    target: TargetOpt = Target.both,
    eps: EpsOpt = None,
    n_examples: NExamplesOpt = None,
    batch_size: BatchSizeOpt = S.batch_size,
    samples: SamplesOpt = None,
    aggregation: AggregationOpt = None,
    gpus: GpusOpt = 1,
    device: DeviceOpt = None,
    seed: SeedOpt = S.seed,
    resume: ResumeOpt = False,
    repeats: RepeatsOpt = S.repeats,
    steps: StepsOpt = None,
    eot: EotOpt = None,
    queries: QueriesOpt = S.square_queries,
    name: NameOpt = None,
    data_root: DataRootOpt = Path("data"),
    precision: PrecisionOpt = Precision(S.precision),
    save_adversarial: SaveAdversarialOpt = None,
    adversarial: AdversarialOpt = None,
    square: SquareOpt = S.square,
    saturation_threshold: SaturationThresholdOpt = S.saturation_threshold,
    restarts: RestartsOpt = None,
    eot_normalise: EotNormaliseOpt = None,
    indicator_examples: IndicatorExamplesOpt = S.indicator_examples,
    no_indicators: NoIndicatorsOpt = False,
    eps_curve: EpsCurveOpt = None,
) -> None:
    """Clean and robust accuracy of the classifier and of CARSO (the paper's Table 2)."""
    options = dict(locals())
    from carso_cli.cli import console, debug_enabled

    if adversarial is not None and gpus > 1:
        raise CarsoError("--adversarial runs in one process: drop --gpus")
    if distributed.should_relaunch(gpus):
        distributed.check_gpus(gpus, device)
        argv = distributed.relaunch_argv(ctx)  # every option as parsed, --no-x included
        try:
            code = distributed.relaunch(gpus, argv, debug=debug_enabled())
        except distributed.RankDied as died:  # an evaluation keeps every finished batch
            raise died.resumable("the finished batches are kept", argv) from None
        if code != 0:
            raise typer.Exit(code)
        return
    if eps_curve is None:
        ev.run_evaluation(job_of(options), console)
        return
    if eps is not None or adversarial is not None:
        raise CarsoError("--eps-curve sets ε itself (one evaluation per radius): drop --eps / --adversarial")
    radii = curve.parse_radii(eps_curve)
    result = curve.run_curve(job_of(options), radii, console, preset_eps=ev.run_config(run).attacks.eps)
    if result is not None:
        curve.render_curve(result, console)


def job_of(o: dict[str, Any]) -> ev.EvalJob:
    """The parsed options as an ``EvalJob`` (ε parsed; None: the run's preset)."""
    values = ev.fields_of_options(ev.EvalSettings, o, RENAMED)
    values["targets"] = ev.targets_of(o["target"].value)
    values["eps"] = None if o["eps"] is None else parse_eps(o["eps"], "--eps")
    values["indicators"] = not o["no_indicators"]
    settings = ev.EvalSettings.from_options(ev.run_config(o["run"]), **values)
    names = ("name", "resume", "data_root", "adversarial", "save_adversarial")
    return ev.EvalJob(o["run"], settings, resolve_device(o["device"]), **{k: o[k] for k in names})


# The options named otherwise than their fields: --steps and --eot are every attack's (AutoAttack's
# default stays 100 steps, section 5.1), --queries Square's.
RENAMED = {"steps": ("aa_steps", "pgd_steps"), "eot": ("aa_eot", "pgd_eot"), "queries": ("square_queries",)}
