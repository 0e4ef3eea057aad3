"""Robustness evaluation: the pieces ``carso eval`` and ``carso sanity`` are made of.

One module per concern: ``seeding`` (per-example z), ``autoattack`` (pyautoattack), ``gradients``
(PGD+EoT, gradient health), ``adaptive`` (the worst case over attack surfaces), ``settings``, ``store``
(resumable results), ``saturation`` (CE-gradient saturation per surface), ``batch`` (one batch),
``runner`` (the split, sharded, from any attack source), ``report``, ``cost``, ``indicators`` (attack-failure
indicators), ``job`` (``carso eval`` as one call), ``checks`` and ``sanity`` (``carso sanity``'s checks and
their run), ``render`` (the tables both print). Everything other modules use is re-exported here.
"""

# ruff: noqa: F401 — the public names of the package, re-exported

from __future__ import annotations

from carso_cli.evaluation.adaptive import (
    AdaptiveResult,
    AttackedBatch,
    AttackOutcome,
    Candidates,
    adaptive_attack,
    adaptive_summary,
    attacks_of,
)
from carso_cli.evaluation.autoattack import (
    AUTOATTACK_LOGGER,
    AutoAttackResult,
    RichLogHandler,
    _Collector,
    _row_keys,
    _set_apgd_iterations,
    autoattack_flags,
    library_logging,
    make_autoattack,
    sub_attack_points,
)
from carso_cli.evaluation.batch import (
    Autocast,
    CountCalls,
    _flags,
    evaluate_batch,
    load_examples,
)
from carso_cli.evaluation.cost import (
    estimate_seconds,
    expected_calls,
    format_duration,
    passes_per_example,
    probe_seconds,
)
from carso_cli.evaluation.gradients import (
    LOSSES,
    GradientStats,
    dlr_loss,
    eot_agreement,
    eot_gradient,
    gradient_health,
    input_gradient,
    label_rank,
    pgd_eot_examples,
)
from carso_cli.evaluation.indicators import (
    INDICATOR_TYPES,
    Convergence,
    EotNoise,
    Reproduction,
    Transfer,
    Unbounded,
    batch_indicators,
    eot_noise,
    implied_eot,
    indicators_summary,
    judge_reproduction,
    non_convergence,
    transfer_beats_whitebox,
    unbounded_attack,
)
from carso_cli.evaluation.job import (
    EvalJob,
    finished_evaluation,
    run_evaluation,
)
from carso_cli.evaluation.report import (
    COLUMNS,
    library_versions,
    merge_records,
    summarize,
)
from carso_cli.evaluation.runner import (
    DatasetAttacks,
    EvalOutcome,
    evaluate,
)
from carso_cli.evaluation.saturation import (
    AUTHORS_SURFACE,
    HEALTHY,
    LOGSUM_SURFACE,
    NONFINITE,
    PAPER_SURFACE,
    SURFACES,
    USELESS,
    gradient_pair,
    paper_surface,
    saturated_flags,
    saturation_summary,
    surface,
    surfaces_of,
)
from carso_cli.evaluation.seeding import (
    STREAM_ADV,
    STREAM_ADV_REPEATS,
    STREAM_ATTACK,
    STREAM_CLEAN,
    STREAM_CLEAN_REPEATS,
    STREAM_EOT_A,
    STREAM_EOT_B,
    STREAM_GRADIENTS,
    ExampleSeededSampler,
    classifier_flags,
    draw_flags,
    example_seed,
    find_carso,
    predict,
    seed_everything,
    seeded_latents,
)
from carso_cli.evaluation.settings import (
    ATTACKS,
    TARGETS,
    AttackBudget,
    EvalSettings,
    batch_ranges,
    default_attack,
    fields_of_options,
    run_config,
    targets_of,
)
from carso_cli.evaluation.store import (
    RESULTS_FILE,
    RESULTS_FORMAT,
    SETTINGS_FILE,
    ResultsStore,
    dumps_compact,
)
