"""AutoAttack through pyautoattack, and its log through rich.

The classifier under the *standard* version, CARSO end-to-end under the *rand* version (APGD-CE +
APGD-DLR with EoT, section 5.1). Its randomness — the random start of APGD and CARSO's z inside the
attack — comes from the global RNG, which the library re-seeds per attack call and we seed per batch
from (seed, batch start). Its results therefore depend on how examples are grouped into batches
(``--batch-size``), but not on the number of processes: batches are defined globally and each process
takes whole batches.

The rand version decides robustness from one stochastic forward of the final adversarial example,
which flatters stochastic defences: we keep every adversarial candidate APGD returns (also for examples
that one final draw then classified correctly) so that they can be re-classified ``repeats`` times.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from carso_cli.evaluation.seeding import seed_everything

AUTOATTACK_LOGGER = "auto-attack"  # pyautoattack logs progress at DEBUG, its checks at WARNING


@dataclass
class AutoAttackResult:
    """Output of one AutoAttack call on a batch.

    flags: (B,) bool — the library's verdict (one forward of its final adversarial example).
    x_adv: (B, C, H, W) — its adversarial examples (the input itself where it found none).
    candidates: (B, C, H, W) — ``x_adv``, or, where the library declared the example robust, the last
        point APGD reported as misclassified during the attack (else the input).
    warnings: the library's warning lines (its checks: zero gradients, randomness, …).
    """

    flags: torch.Tensor
    x_adv: torch.Tensor
    candidates: torch.Tensor
    warnings: list[str] = field(default_factory=list)


def _set_apgd_iterations(apgd: Any, steps: int) -> None:
    """Change an APGD attack's iterations and the checkpoints derived from them (as its __init__ does)."""
    apgd.n_iter = steps
    apgd.n_iter_orig = steps
    apgd.n_iter_2 = max(int(0.22 * steps), 1)
    apgd.n_iter_min = max(int(0.06 * steps), 1)
    apgd.size_decr = max(int(0.03 * steps), 1)


def make_autoattack(
    model: nn.Module, *, eps: float, version: str, seed: int, device: torch.device, steps: int = 100,
    eot: int = 20, square_queries: int = 5000, attacks: Sequence[str] | None = None,
) -> Any:
    """A pyautoattack ``AutoAttack`` with the paper's settings (section 5.1), steps/EoT/queries overridable.

    ``version``: "standard" (APGD-CE, APGD-T, FAB-T, Square; the classifier alone), "rand" (APGD-CE and
    APGD-DLR with ``eot`` EoT iterations; CARSO end-to-end) or "custom" with ``attacks``.
    """
    from pyautoattack import AutoAttack

    kwargs: dict[str, Any] = {}
    if version == "custom":
        kwargs["attacks"] = list(attacks or [])
    # The device must be given: the library's default is 'cpu'.
    aa = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=device, **kwargs)
    _set_apgd_iterations(aa.apgd, steps)
    _set_apgd_iterations(aa.apgd_targeted, steps)
    aa.fab.n_iter = steps
    aa.square.n_queries = square_queries
    if version == "rand":
        aa.apgd.eot_iter = eot
    if version == "custom":
        aa.apgd.n_restarts = 1  # as the rand version (the library's default for custom is 5)
    return aa


def _row_keys(x: torch.Tensor) -> list[bytes]:
    flat = x.detach().to("cpu", torch.float32).reshape(x.shape[0], -1).numpy()
    return [row.tobytes() for row in flat]


def autoattack_flags(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str, seed: int,
    device: torch.device, steps: int = 100, eot: int = 20, square_queries: int = 5000,
    attacks: Sequence[str] | None = None,
) -> AutoAttackResult:
    """Run pyautoattack's ``run_standard_evaluation`` on one batch (already on ``device``).

    The global RNG is seeded with ``seed`` first (the library's own clean pass draws from it), and the
    library re-seeds it with ``seed`` before every attack.
    """
    aa = make_autoattack(model, eps=eps, version=version, seed=seed, device=device, steps=steps, eot=eot,
                         square_queries=square_queries, attacks=attacks)
    # Keep what APGD returns: for an example that one final draw classifies correctly the library
    # drops the point APGD found, and re-classification needs it.
    keys = {key: i for i, key in enumerate(_row_keys(x))}
    candidates = x.detach().clone()
    original = aa.apgd.perturb

    def perturb(xb: torch.Tensor, yb: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        adv = original(xb, yb, *args, **kwargs)
        changed = (adv.detach() != xb.detach()).flatten(1).any(dim=1)
        for j, key in enumerate(_row_keys(xb)):
            if changed[j] and key in keys:
                candidates[keys[key]] = adv[j].detach().to(candidates.device)
        return adv

    aa.apgd.perturb = perturb
    warnings: list[str] = []
    collector = _Collector(warnings)
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    logger.addHandler(collector)
    try:
        seed_everything(seed)
        x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    finally:
        logger.removeHandler(collector)
    flags = (y_adv.to(y.device) == y).cpu()
    found = ~flags.to(x.device)
    candidates[found] = x_adv[found].to(candidates.device)
    return AutoAttackResult(flags, x_adv.detach(), candidates, warnings)


class _Collector(logging.Handler):
    """Keeps the library's warnings (they go into the results file)."""

    def __init__(self, out: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


class RichLogHandler(logging.Handler):
    """Prints log records through a rich console (so they interleave cleanly with progress bars)."""

    def __init__(self, console: Any, prefix: str = "") -> None:
        super().__init__(level=logging.DEBUG)
        self.console = console
        self.prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        from rich.markup import escape

        try:
            text = escape(record.getMessage())
            if record.levelno >= logging.WARNING:
                self.console.print(f"[yellow]{self.prefix}warning: {text}[/]", highlight=False)
            else:
                self.console.print(f"[dim]{self.prefix}{text}[/]", highlight=False)
        except Exception:  # noqa: BLE001 — a broken console must not abort an evaluation
            self.handleError(record)


@contextlib.contextmanager
def library_logging(console: Any | None, level: int = logging.DEBUG, prefix: str = "auto-attack: ") -> Iterator[None]:
    """Show pyautoattack's log (progress at DEBUG, its checks at WARNING) through ``console``."""
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    old = (logger.level, logger.propagate)
    handler = RichLogHandler(console, prefix) if console is not None else None
    logger.setLevel(level)
    logger.propagate = False  # the root handler would print the warnings a second time
    if handler is not None:
        handler.setLevel(level)
        logger.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]
