"""AutoAttack through pyautoattack, and its log through rich.

The classifier under the *standard* version, CARSO end-to-end under the *rand* version (APGD-CE +
APGD-DLR with EoT, section 5.1). Its randomness — the random start of APGD and CARSO's z inside the
attack — comes from the global RNG, which the library re-seeds per attack call and we seed per batch
from (seed, batch start). Its results therefore depend on how examples are grouped into batches
(``--batch-size``), but not on the number of processes: batches are defined globally and each process
takes whole batches.

The rand version decides robustness from one stochastic forward of the final adversarial example,
which flatters stochastic defences: we keep every sub-attack's final point (APGD's misclassified point,
else its highest-loss point; Square's lowest-margin point), also for examples that one draw then
classified correctly, so that each can be re-classified ``repeats`` times by the model as evaluated.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carso_cli.evaluation.seeding import seed_everything

AUTOATTACK_LOG = "autoattack.log"  # in RUN/eval/NAME: the library's whole log, off the terminal
AUTOATTACK_LOGGER = "auto-attack"  # pyautoattack logs progress at DEBUG, its checks at WARNING


@dataclass
class AutoAttackResult:
    """Output of one AutoAttack call on a batch.

    flags: (B,) bool — the library's verdict (one forward of its final adversarial example).
    x_adv: (B, C, H, W) — its adversarial examples (the input itself where it found none).
    candidates: (K, B, C, H, W) — every sub-attack's final point: for APGD the point it found
        misclassified, else its highest-loss point (the library returns the input there); for Square
        its lowest-margin point. The input where a sub-attack did not run on an example.
    sources: the K sub-attacks, in the order they ran ("apgd-ce", "apgd-dlr", "square").
    warnings: the library's warning lines (its checks: zero gradients, randomness, …).
    """

    flags: torch.Tensor
    x_adv: torch.Tensor
    candidates: torch.Tensor
    sources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def point(self) -> torch.Tensor:
        """(B, C, H, W): the library's adversarial example where it found one, else the first candidate."""
        broken = ~self.flags.to(self.x_adv.device)
        return torch.where(
            broken.view(-1, *[1] * (self.x_adv.dim() - 1)), self.x_adv, self.candidates[0].to(self.x_adv.device)
        )


def _set_apgd_iterations(apgd: Any, steps: int) -> None:
    """Change an APGD attack's iterations and the checkpoints derived from them (as its __init__ does)."""
    apgd.n_iter = steps
    apgd.n_iter_orig = steps
    apgd.n_iter_2 = max(int(0.22 * steps), 1)
    apgd.n_iter_min = max(int(0.06 * steps), 1)
    apgd.size_decr = max(int(0.03 * steps), 1)


def make_autoattack(
    model: nn.Module,
    *,
    eps: float,
    version: str,
    seed: int,
    device: torch.device,
    steps: int = 100,
    eot: int = 20,
    square_queries: int = 5000,
    attacks: Sequence[str] | None = None,
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


class _PointRecorder:
    """Keeps, per sub-attack and example, the final point of the library's ``attack_single_run``.

    The library returns only points that fooled its single draw (``perturb`` keeps ``x_best_adv`` where
    the run misclassified, else the input), so an APGD run that raised the loss without a misclassified
    draw, or a Square run that lowered the margin, leaves nothing to re-judge. We wrap
    ``attack_single_run`` (APGD returns ``(x_best, acc, loss_best, x_best_adv)``, Square
    ``(n_queries, x_best)``) and find each row's example by its bytes (the library passes subsets).
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.detach()
        self.rows: dict[bytes, list[int]] = {}
        for i, key in enumerate(_row_keys(x)):
            self.rows.setdefault(key, []).append(i)
        self.points: dict[str, torch.Tensor] = {}

    def _store(self, name: str, xb: torch.Tensor, point: torch.Tensor) -> None:
        out = self.points.setdefault(name, self.x.clone())
        seen: dict[bytes, int] = {}
        for j, key in enumerate(_row_keys(xb)):
            rows = self.rows.get(key)
            if rows:  # identical inputs: the c-th copy in the subset goes to the c-th copy in the batch
                c = seen[key] = seen.get(key, -1) + 1
                out[rows[min(c, len(rows) - 1)]] = point[j].detach().to(out.device, out.dtype)

    def wrap_apgd(self, apgd: Any) -> None:
        original = apgd.attack_single_run

        def run(xb: torch.Tensor, yb: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            x_best, acc, loss_best, x_best_adv = original(xb, yb, *args, **kwargs)
            fooled = (acc == 0).view(-1, *[1] * (xb.dim() - 1))
            self._store(f"apgd-{apgd.loss}", xb, torch.where(fooled, x_best_adv, x_best))
            return x_best, acc, loss_best, x_best_adv

        apgd.attack_single_run = run

    def wrap_square(self, square: Any) -> None:
        original = square.attack_single_run

        def run(xb: torch.Tensor, yb: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            n_queries, x_best = original(xb, yb, *args, **kwargs)
            self._store("square", xb, x_best)
            return n_queries, x_best

        square.attack_single_run = run

    def stacked(self) -> tuple[torch.Tensor, list[str]]:
        """(K, B, C, H, W) and the K names; the input alone (K = 1, "none") if nothing ran."""
        if not self.points:
            return self.x.clone()[None], ["none"]
        names = list(self.points)
        return torch.stack([self.points[n] for n in names]), names


def autoattack_flags(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int, **settings: Any
) -> AutoAttackResult:
    """Run pyautoattack's ``run_standard_evaluation`` on one batch (already on ``device``).

    ``settings``: the rest of ``make_autoattack``'s keywords (eps, version and device; steps, eot,
    square_queries, attacks). The global RNG is seeded with ``seed`` first (the library's own clean pass
    draws from it), and the library re-seeds it with ``seed`` before every attack. As in the library, a
    sub-attack runs only on the examples the earlier ones did not fool (by its single draw); every
    sub-attack's point is kept.
    """
    aa = make_autoattack(model, seed=seed, **settings)
    recorder = _PointRecorder(x)
    recorder.wrap_apgd(aa.apgd)
    recorder.wrap_square(aa.square)
    warnings: list[str] = []
    with _collect_warnings(warnings):
        seed_everything(seed)
        x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=x.shape[0])
    flags = (y_adv.to(y.device) == y).cpu()
    candidates, sources = recorder.stacked()
    return AutoAttackResult(flags, x_adv.detach(), candidates, sources, warnings)


def sub_attack_points(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attacks: Sequence[str],
    seed: int,
    device: torch.device,
    eot: int = 1,
    **settings: Any,
) -> AutoAttackResult:
    """Each of ``attacks`` ("apgd-ce", "apgd-dlr", "square") run once on *every* example, independently.

    Unlike ``run_standard_evaluation`` (and the library's ``perturb``), a sub-attack also runs where the
    attacked surface is already wrong or an earlier sub-attack fooled it: in the adaptive evaluation that
    surface is not the judge (a transfer source, the logsum surface) and its verdict decides nothing.
    One run of the library's ``attack_single_run`` per sub-attack, seeded like the library (its RNG is
    re-seeded with ``seed`` before each). ``settings``: ``make_autoattack``'s eps, steps, square_queries.
    ``flags`` (information only): the attacked surface was right on every sub-attack's point; ``x_adv``:
    the candidate of the first sub-attack that fooled it.
    """
    aa = make_autoattack(model, version="custom", attacks=list(attacks), seed=seed, device=device, **settings)
    aa.apgd.eot_iter = eot
    recorder = _PointRecorder(x)
    recorder.wrap_apgd(aa.apgd)
    recorder.wrap_square(aa.square)
    xf, yf = x.detach().float().to(device), y.detach().long().to(device)
    warnings: list[str] = []
    with _collect_warnings(warnings):
        _run_sub_attacks(aa, attacks, xf, yf, seed)
    candidates, sources = recorder.stacked()
    with torch.no_grad():
        right = torch.stack([model(c.to(device)).argmax(dim=-1) == yf for c in candidates]).cpu()  # (K, B)
    first = (~right).long().argmax(dim=0)  # the first sub-attack that fooled the surface (0 if none did)
    x_adv = torch.where(
        right.all(dim=0).view(-1, *[1] * (x.dim() - 1)).to(x.device),
        x.detach(),
        candidates[first, torch.arange(x.shape[0])].to(x.device),
    )
    return AutoAttackResult(right.all(dim=0), x_adv, candidates, sources, warnings)


def _run_sub_attacks(aa: Any, attacks: Sequence[str], x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
    """One ``attack_single_run`` per sub-attack on every example, each seeded like the library."""
    for name in attacks:
        if name in ("apgd-ce", "apgd-dlr"):
            attack = aa.apgd
            attack.loss = name.removeprefix("apgd-")
        elif name == "square":
            attack = aa.square
        else:
            raise ValueError(f"unknown sub-attack '{name}'")
        attack.seed = seed
        attack.init_hyperparam(x)
        seed_everything(seed)
        attack.attack_single_run(x, y)


@contextlib.contextmanager
def _collect_warnings(out: list[str]) -> Iterator[None]:
    collector = _Collector(out)
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    logger.addHandler(collector)
    try:
        yield
    finally:
        logger.removeHandler(collector)


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


class _Counter(logging.Handler):
    """Counts the records (all, and warnings) for the on-screen summary of the log file."""

    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__(level=logging.DEBUG)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        self.counts["lines"] += 1
        self.counts["warnings"] += record.levelno >= logging.WARNING


@contextlib.contextmanager
def library_logging(
    console: Any | None, level: int = logging.DEBUG, prefix: str = "auto-attack: ", log_path: Path | None = None
) -> Iterator[dict[str, int]]:
    """Show pyautoattack's log (progress at DEBUG, its checks at WARNING) through ``console``.

    With ``log_path``: the whole log is appended to that file and only the warnings reach the console
    (AutoAttack's per-attack lines would flood the terminal under the progress bar). Yields the counts
    ``{"lines": …, "warnings": …}`` of the records seen, for a one-line summary.
    """
    logger = logging.getLogger(AUTOATTACK_LOGGER)
    old = (logger.level, logger.propagate)
    counts = {"lines": 0, "warnings": 0}
    handlers: list[logging.Handler] = [_Counter(counts)]
    if console is not None:
        handlers.append(RichLogHandler(console, prefix))
        handlers[-1].setLevel(logging.WARNING if log_path is not None else level)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file_handler)
    logger.setLevel(level)
    logger.propagate = False  # the root handler would print the warnings a second time
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield counts
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(old[0])
        logger.propagate = old[1]
