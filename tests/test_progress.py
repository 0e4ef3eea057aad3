"""The shared progress display's ETA and the AutoAttack log file of long evaluations."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

from rich.console import Console

from carso_cli import evaluation as ev
from carso_cli.evaluation.runner import _deadline
from carso_cli.progress import eta_seconds, progress_bar


def test_eta_follows_the_deadline_else_the_average_speed() -> None:
    progress = progress_bar(Console(file=io.StringIO()))
    now = time.monotonic()
    task = progress.add_task("evaluation", total=10, deadline=now + 120)
    assert abs(eta_seconds(progress.tasks[task], now) - 120) < 1e-6
    other = progress.add_task("sanity", total=10)
    assert eta_seconds(progress.tasks[other], now) is None  # not started, nothing done: unknown
    progress.start_task(other)
    progress.tasks[other].start_time = now - 30  # 3 of 10 done in 30 s → 70 s left
    progress.update(other, completed=3)
    assert abs(eta_seconds(progress.tasks[other], now) - 70) < 1e-6


def test_deadline_is_calibrated_from_finished_batches_without_the_indicators() -> None:
    assert _deadline([], 64, 123.0) == 123.0  # nothing finished: the cost estimate stays
    # 40 s of attacks for 32 examples (the indicators' seconds already taken out) → 1.25 s per example.
    left = _deadline([(40.0, 32)], 64, None) - time.monotonic()
    assert 79 < left <= 80


def test_autoattack_log_goes_to_the_file_warnings_to_the_screen(tmp_path: Path) -> None:
    buffer = io.StringIO()
    logger = logging.getLogger(ev.AUTOATTACK_LOGGER)
    before = (logger.level, logger.propagate, list(logger.handlers))
    path = tmp_path / "eval" / "demo" / "autoattack.log"
    with ev.library_logging(Console(file=buffer, width=200), log_path=path) as counts:
        logger.debug("apgd-ce - 1/1 - 3 out of 8 successfully perturbed")
        logger.warning("there are 2 points with zero gradient!")
    assert counts == {"lines": 2, "warnings": 1}
    text = buffer.getvalue()
    assert "apgd-ce" not in text and "warning: there are 2 points with zero gradient!" in text
    log = path.read_text()
    assert "apgd-ce - 1/1 - 3 out of 8" in log and "zero gradient" in log
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_eta_column_says_late_past_the_deadline() -> None:
    from carso_cli.progress import EtaColumn

    progress = progress_bar(Console(file=io.StringIO()))
    late = progress.add_task("evaluation", total=10, deadline=time.monotonic() - 40)
    assert str(EtaColumn().render(progress.tasks[late])).startswith("late 0:00:4")
    counter = progress.add_task("forward passes", total=None)
    assert str(EtaColumn().render(progress.tasks[counter])) == ""  # an open-ended counter has no ETA


def test_the_cost_estimate_counts_the_indicators() -> None:
    from dataclasses import replace

    from carso_cli.evaluation.cost import indicator_passes, passes_per_example
    from carso_cli.evaluation.settings import EvalSettings

    s = EvalSettings(
        attack="adaptive",
        targets=["classifier", "carso"],
        eps=8 / 255,
        n_examples=32,
        batch_size=32,
        samples=8,
        aggregation="dexp",
        seed=0,
        repeats=2,
        aa_steps=10,
        aa_eot=2,
        indicator_examples=8,
    )
    carso, _ = passes_per_example(s, 10)
    assert indicator_passes(s, carso) > carso  # each attack again at ε = 0.5 and with 2× steps and EoT
    assert indicator_passes(replace(s, indicators=False), carso) == 0.0
    assert indicator_passes(replace(s, attack="autoattack"), carso) == 0.0


def test_the_cost_estimate_counts_only_the_examples_attacked() -> None:
    """Attacks skip misclassified examples: on the demo's tiny model (10 of 32 right) the estimate that
    assumed all 32 attacked was 3.4× the measured time."""
    from carso_cli.evaluation.cost import RECLASSIFY_PASSES, attacked_passes, passes_per_example
    from carso_cli.evaluation.settings import EvalSettings

    s = EvalSettings(attack="adaptive", targets=["classifier", "carso"], eps=8 / 255, n_examples=32, repeats=2)
    full = passes_per_example(s, 10)
    assert attacked_passes(s, 10, (1.0, 1.0)) == full
    carso, classifier = attacked_passes(s, 10, (0.25, 0.5))
    reclassify = RECLASSIFY_PASSES * s.repeats
    assert carso == reclassify + 0.25 * (full[0] - reclassify) and classifier == 0.5 * full[1]
    assert attacked_passes(s, 10, (0.0, 0.0)) == (reclassify, 0.0)  # nothing attacked: re-classification only
