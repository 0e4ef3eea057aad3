"""Robustness evaluation: the pieces ``carso eval`` and ``carso sanity`` are made of.

* **Per-example seeding.** CARSO is stochastic (the purifier samples z). For clean classification,
  re-classification and PGD+EoT, ``ExampleSeededSampler`` replaces ``CARSO.latent_sampler`` so that the
  z of example *i* at its *k*-th forward comes from a generator seeded by (seed, stream, i, k): results
  then depend neither on the batch size nor on the number of processes.
* **AutoAttack** (pyautoattack): the classifier under the *standard* version, CARSO end-to-end under the
  *rand* version (APGD-CE + APGD-DLR with EoT, section 5.1). Its randomness — the random start of APGD
  and CARSO's z inside the attack — comes from the global RNG, which the library re-seeds per attack
  call and we seed per batch from (seed, batch start). Its results therefore depend on how examples are
  grouped into batches (``--batch-size``), but not on the number of processes: batches are defined
  globally and each process takes whole batches.
* **Single draw vs. repeats.** The rand version decides robustness from one stochastic forward of the
  final adversarial example, which flatters stochastic defences. We keep every adversarial candidate
  APGD returns (also for examples that one final draw then classified correctly) and re-classify each
  clean and adversarial example ``repeats`` times: mean ± std over draws and the worst case.
* **Results store.** Every batch is written atomically to ``batch-NNNNN.json`` with the settings it was
  computed with; ``resume`` skips the batches already on disk (refusing ones made with other settings).
* **Sharding.** Whole batches are split in contiguous ranges over the processes (``distributed.shard``)
  and rank 0 gathers the records: 1 process and N processes give the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carso_cli import __version__, distributed
from carso_cli import checkpoint as ckpt
from carso_cli.errors import CarsoError
from carso_cli.models.carso import CARSO, LatentSampler

ATTACKS = ("autoattack", "pgd-eot", "none")
TARGETS = ("classifier", "carso")
RESULTS_FORMAT = "carso-eval/1"
RESULTS_FILE = "results.json"
SETTINGS_FILE = "settings.json"

# Streams of per-example randomness: one per use, so that draws never coincide across uses.
STREAM_CLEAN = 0
STREAM_CLEAN_REPEATS = 1
STREAM_ATTACK = 2
STREAM_ADV = 3
STREAM_ADV_REPEATS = 4
STREAM_GRADIENTS = 5
STREAM_EOT_A = 6
STREAM_EOT_B = 7

AUTOATTACK_LOGGER = "auto-attack"  # pyautoattack logs progress at DEBUG, its checks at WARNING


# --------------------------------------------------------------------------------------------------
# Per-example seeding
# --------------------------------------------------------------------------------------------------


def example_seed(*parts: int | str, bits: int = 63) -> int:
    """A ``bits``-bit seed hashed from a tuple of ints/strings (stable across processes and platforms)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little") & ((1 << bits) - 1)


class ExampleSeededSampler:
    """A ``CARSO.latent_sampler`` whose z for example ``i`` depend only on (seed, stream, i) and the call.

    ``bind(indices)`` names the dataset indices of the rows of the next forwards and gives each example
    its own generator, keyed by (seed, stream, index) with 128 bits (numpy's Philox: torch's CPU
    generator keeps only 32 bits of a seed). Call k then draws the k-th z of every example's stream,
    so an example's z do not depend on which other examples share its batch, or on the process.
    A forward on ``r·B`` rows (an attack stacking ``r`` EoT copies of a batch of ``B``) draws the r
    copies of each example one after the other from its stream.

    z are drawn on the CPU and moved to the device: microseconds per example and call, small beside a
    forward pass through CARSO.
    """

    def __init__(self, seed: int, stream: int) -> None:
        self.seed = seed
        self.stream = stream
        self.indices: list[int] = []
        self.generators: list[np.random.Generator] = []
        self.calls = 0

    def bind(self, indices: Sequence[int]) -> ExampleSeededSampler:
        self.indices = [int(i) for i in indices]
        self.generators = [
            np.random.Generator(np.random.Philox(key=example_seed(self.seed, self.stream, i, bits=128)))
            for i in self.indices
        ]
        self.calls = 0
        return self

    def __call__(self, n: int, b: int, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        k = len(self.indices)
        if k == 0 or b % k:
            raise RuntimeError(f"seeded sampler bound to {k} examples was asked for a batch of {b}")
        z = np.empty((n, b, d), dtype=np.float32)
        for copy in range(b // k):
            for j, g in enumerate(self.generators):
                z[:, copy * k + j] = g.standard_normal((n, d), dtype=np.float32)
        self.calls += 1
        return torch.from_numpy(z).to(device=device, dtype=dtype)


@contextlib.contextmanager
def seeded_latents(model: nn.Module, sampler: LatentSampler | None) -> Iterator[None]:
    """Install ``sampler`` as the latent sampler of ``model`` when it is a CARSO; restore on exit."""
    carso = find_carso(model)
    if carso is None or sampler is None:
        yield
        return
    old = carso.latent_sampler
    carso.latent_sampler = sampler
    try:
        yield
    finally:
        carso.latent_sampler = old


def find_carso(model: nn.Module) -> CARSO | None:
    """The CARSO inside ``model`` (itself, or wrapped by ``CountCalls`` / ``Autocast``), else None."""
    while not isinstance(model, CARSO):
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model


def seed_everything(seed: int) -> None:
    """Seed the global CPU and CUDA generators (what pyautoattack and ``standard_normal_sampler`` use)."""
    torch.manual_seed(seed & 0x7FFF_FFFF)


# --------------------------------------------------------------------------------------------------
# One function per evaluation kind: (model, x, y, …) → per-example flags
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """argmax of the model's scores. x (B, C, H, W) → labels (B,)."""
    return model(x).argmax(dim=-1)


def classifier_flags(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correctness (B,) bool of a deterministic classifier."""
    return (predict(classifier, x) == y).cpu()


def draw_flags(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], seed: int, stream: int,
    repeats: int = 1,
) -> torch.Tensor:
    """Correctness (repeats, B) of ``repeats`` stochastic forwards; row r uses the r-th z of each example's
    own stream (seed, stream, index), whatever the batch. For a deterministic model all rows are equal.
    """
    sampler = ExampleSeededSampler(seed, stream).bind(indices)
    rows = []
    with seeded_latents(model, sampler):
        for _ in range(repeats):
            rows.append((predict(model, x) == y).cpu())
    return torch.stack(rows)


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


def pgd_eot_examples(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *, eps: float, steps: int,
    step_size: float, eot: int, seed: int, callback: Callable[..., Any] | None = None,
) -> torch.Tensor:
    """Adversarial examples (B, C, H, W) by the PGD+EoT pipeline of Lee & Kim 2024 (Table 14).

    The attack's z draws are seeded per example (stream ``STREAM_ATTACK``), so the result does not
    depend on the batch.
    """
    from carso_cli.attacks import pgd_eot

    sampler = ExampleSeededSampler(seed, STREAM_ATTACK).bind(indices)
    with seeded_latents(model, sampler):
        return pgd_eot(model, x, y, eps, steps, step_size, eot, random_start=False, callback=callback).detach()


@dataclass
class GradientStats:
    """Health of input gradients of an attack loss on the model's scores, over examples × draws."""

    entries: int = 0
    zero_entries: int = 0
    nonfinite_entries: int = 0
    gradients: int = 0  # examples × draws
    bad_gradients: int = 0  # entirely zero, or with a non-finite entry (useless for a sign step)
    excluded: int = 0  # gradients left out because the loss is flat by construction (DLR, label 3rd)

    def __add__(self, other: GradientStats) -> GradientStats:
        return GradientStats(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "bad_entry_fraction": self.bad_entry_fraction,
                "bad_gradient_fraction": self.bad_gradient_fraction}

    @property
    def bad_entry_fraction(self) -> float:
        return (self.zero_entries + self.nonfinite_entries) / max(self.entries, 1)

    @property
    def bad_gradient_fraction(self) -> float:
        return self.bad_gradients / max(self.gradients, 1)


def dlr_loss(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AutoAttack's difference-of-logits-ratio loss (Croce & Hein 2020), per example. (B, C), (B,) → (B,)."""
    s_sorted, order = scores.sort(dim=1)
    top_is_y = (order[:, -1] == y).to(scores.dtype)
    s_y = scores.gather(1, y[:, None])[:, 0]
    best_other = s_sorted[:, -2] * top_is_y + s_sorted[:, -1] * (1.0 - top_is_y)
    return -(s_y - best_other) / (s_sorted[:, -1] - s_sorted[:, -3] + 1e-12)


LOSSES = {
    "ce": lambda scores, y: F.cross_entropy(scores, y, reduction="none"),
    "dlr": dlr_loss,
}


def input_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce", return_scores: bool = False,
) -> Any:
    """∇ₓ Σ loss(model(x), y): (B, C, H, W) — "ce" or "dlr", the losses of randAA's two APGD runs.

    With ``return_scores`` also the model's scores (B, classes) of that same forward.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores = model(x).float()
        value = LOSSES[loss](scores, y).sum()
        (grad,) = torch.autograd.grad(value, x, allow_unused=True)
    grad = torch.zeros_like(x) if grad is None else grad.detach()
    return (grad, scores.detach()) if return_scores else grad


def label_rank(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """0-based rank of the label among the scores (0 = predicted). (B, C), (B,) → (B,)."""
    return (scores > scores.gather(1, y[:, None])).sum(dim=1)


def gradient_health(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *, draws: int, seed: int,
    loss: str = "ce",
) -> GradientStats:
    """Count zero / non-finite gradient entries and useless gradients over ``draws`` stochastic draws.

    For DLR, examples whose label is ranked third are left out (and counted in ``excluded``): there the
    loss is −(z_y − z_π1)/(z_π1 − z_π3) ≡ 1, flat by construction of the loss, not by the model.
    """
    sampler = ExampleSeededSampler(seed, STREAM_GRADIENTS).bind(indices)
    stats = GradientStats()
    with seeded_latents(model, sampler):
        for _ in range(draws):
            g, scores = input_gradient(model, x, y, loss, return_scores=True)
            g = g.flatten(1)
            if loss == "dlr":
                keep = label_rank(scores, y) != 2
                stats.excluded += int((~keep).sum())
                g = g[keep]
            finite = torch.isfinite(g)
            zero = g == 0
            stats.entries += g.numel()
            stats.zero_entries += int(zero.sum())
            stats.nonfinite_entries += int((~finite).sum())
            stats.gradients += g.shape[0]
            stats.bad_gradients += int((zero.all(dim=1) | ~finite.all(dim=1)).sum())
    return stats


def eot_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sampler: ExampleSeededSampler,
                 eot: int, loss: str = "ce") -> torch.Tensor:
    """Mean input gradient over ``eot`` draws (the EoT estimate). (B, C, H, W)."""
    total = torch.zeros_like(x)
    with seeded_latents(model, sampler):
        for _ in range(eot):
            total += input_gradient(model, x, y, loss)
    return total / eot


def eot_agreement(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *, eot: int, seed: int,
    loss: str = "ce",
) -> torch.Tensor:
    """Cosine (B,) between two independent EoT gradient estimates of each example (0 if one is zero)."""
    a = eot_gradient(model, x, y, ExampleSeededSampler(seed, STREAM_EOT_A).bind(indices), eot, loss).flatten(1)
    b = eot_gradient(model, x, y, ExampleSeededSampler(seed, STREAM_EOT_B).bind(indices), eot, loss).flatten(1)
    cos = F.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-300)
    return torch.nan_to_num(cos, nan=0.0).float().cpu()


# --------------------------------------------------------------------------------------------------
# The attack library's log lines, through rich
# --------------------------------------------------------------------------------------------------


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


class CountCalls(nn.Module):
    """Wraps a model and calls ``on_call()`` after every forward (drives progress bars inside attacks)."""

    def __init__(self, model: nn.Module, on_call: Callable[[], None]) -> None:
        super().__init__()
        self.model = model
        self.on_call = on_call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.on_call()
        return out


# --------------------------------------------------------------------------------------------------
# Settings, batches, results store
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    """Everything that determines the numbers of an evaluation (stored with every batch)."""

    attack: str = "autoattack"
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    eps: float = 8 / 255
    n_examples: int = 0
    batch_size: int = 64
    samples: int = 8
    aggregation: str = "dexp"
    seed: int = 0
    repeats: int = 10
    # AutoAttack (section 5.1): 100 APGD steps, 20 EoT iterations for the rand version, Square 5000 queries.
    aa_steps: int = 100
    aa_eot: int = 20
    square_queries: int = 5000
    # PGD+EoT (Table 14): 200 steps of 0.007, 20 EoT iterations.
    pgd_steps: int = 200
    pgd_step_size: float = 0.007
    pgd_eot: int = 20
    precision: str = "float32"
    dataset: str = ""
    split: str = "test"
    classifier_sha256: str = ""
    purifier_sha256: str = ""

    def validate(self) -> None:
        if self.attack not in ATTACKS:
            raise CarsoError(f"unknown attack '{self.attack}' (choose from {', '.join(ATTACKS)})")
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise CarsoError(f"targets must be among {', '.join(TARGETS)}, got {self.targets}")
        if not 0.0 <= self.eps <= 1.0:
            raise CarsoError(f"eps must lie in [0, 1], got {self.eps}")
        for name in ("batch_size", "repeats", "aa_steps", "aa_eot", "pgd_steps", "pgd_eot"):
            if getattr(self, name) < 1:
                raise CarsoError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.square_queries < 1:
            raise CarsoError(f"square queries must be at least 1, got {self.square_queries}")
        if self.precision not in ("float32", "bfloat16"):
            raise CarsoError(f"precision must be float32 or bfloat16, got {self.precision}")

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # exactly what a file round-trip gives


def batch_ranges(n: int, batch_size: int) -> list[range]:
    """Global batches: contiguous ranges of ``batch_size`` examples (the last one shorter)."""
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


class ResultsStore:
    """``DIR/batch-NNNNN.json`` per batch (atomic), ``DIR/settings.json``, ``DIR/results.json``."""

    def __init__(self, directory: Path, settings: dict[str, Any], resume: bool) -> None:
        self.dir = Path(directory)
        self.settings = settings
        self.resume = resume

    def batch_path(self, k: int) -> Path:
        return self.dir / f"batch-{k:05d}.json"

    def check(self) -> None:
        """With ``resume``: refuse a directory whose results were made with other settings."""
        path = self.dir / SETTINGS_FILE
        if self.resume and path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise CarsoError(f"{path} is unreadable ({err}); start again without --resume") from None
            if stored != self.settings:
                raise self._mismatch(stored)

    def _mismatch(self, stored: dict[str, Any]) -> CarsoError:
        diff = [k for k in sorted(set(stored) | set(self.settings)) if stored.get(k) != self.settings.get(k)]
        shown = ", ".join(f"{k}: {stored.get(k)!r} → {self.settings.get(k)!r}" for k in diff[:4])
        return CarsoError(
            f"{self.dir} holds results made with other settings ({shown}); use another --name, "
            "or drop --resume to overwrite them"
        )

    def prepare(self) -> None:
        """Main process: create the directory; without ``resume`` clear earlier results."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            for old in [*self.dir.glob("batch-*.json"), self.dir / RESULTS_FILE]:
                old.unlink(missing_ok=True)
        ckpt.atomic_write_json(self.dir / SETTINGS_FILE, self.settings)

    def load(self, k: int) -> dict[str, Any] | None:
        """A finished batch's record (with ``resume``), None when it must be computed."""
        path = self.batch_path(k)
        if not self.resume or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # cannot happen with atomic writes, but a damaged file is just redone
        if record.get("settings") != self.settings:
            raise self._mismatch(record.get("settings") or {})
        return record

    def save(self, k: int, record: dict[str, Any]) -> None:
        ckpt.atomic_write_text(self.batch_path(k), dumps_compact(record))


def dumps_compact(obj: Any) -> str:
    """JSON with indentation, but lists of numbers/booleans on one line (per-example flags)."""

    def enc(o: Any, depth: int) -> str:
        pad, inner = "  " * depth, "  " * (depth + 1)
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{inner}{json.dumps(str(k))}: {enc(v, depth + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if all(not isinstance(v, (dict, list, tuple)) for v in o):
                return "[" + ", ".join(json.dumps(v) for v in o) + "]"
            return "[\n" + ",\n".join(inner + enc(v, depth + 1) for v in o) + "\n" + pad + "]"
        return json.dumps(o)

    return enc(obj, 0) + "\n"


# --------------------------------------------------------------------------------------------------
# The evaluation of one batch, and of the whole split
# --------------------------------------------------------------------------------------------------


class Autocast(nn.Module):
    """Runs a model under bfloat16 autocast (CUDA), returning float32 scores."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.device_type = device.type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.model(x).float()


def _flags(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def evaluate_batch(
    classifier: nn.Module, carso: nn.Module | None, x: torch.Tensor, y: torch.Tensor, indices: range,
    settings: EvalSettings, device: torch.device, on_call: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Every flag of one batch. x (B, C, H, W) and y (B,) on ``device``; returns JSON-ready lists.

    Keys (each a list over the batch, or ``repeats`` lists for ``*_repeats``):
    ``classifier_clean``, ``carso_clean``, ``carso_clean_repeats``; with AutoAttack ``classifier_aa``,
    ``carso_randaa`` (+ ``carso_randaa_library``, ``carso_randaa_repeats``); with PGD+EoT
    ``classifier_pgd_eot``, ``carso_pgd_eot`` (+ ``carso_pgd_eot_repeats``). A robust flag is set only
    when the clean flag is too (robust accuracy ≤ clean accuracy by construction).
    """
    s = settings
    out: dict[str, Any] = {}
    warnings: list[str] = []
    tick = on_call or (lambda: None)
    counted_classifier = CountCalls(classifier, tick)
    counted_carso = CountCalls(carso, tick) if carso is not None else None
    idx = list(indices)
    if "classifier" in s.targets:
        clean = classifier_flags(classifier, x, y)
        out["classifier_clean"] = _flags(clean)
        if s.attack == "autoattack":
            res = autoattack_flags(counted_classifier, x, y, eps=s.eps, version="standard",
                                   seed=example_seed(s.seed, "classifier", idx[0], bits=31),
                                   device=device, steps=s.aa_steps, square_queries=s.square_queries)
            out["classifier_aa"] = _flags(res.flags & clean)
            warnings += [f"classifier: {w}" for w in res.warnings]
        elif s.attack == "pgd-eot":
            # The classifier is deterministic: one EoT iteration is the same attack, 20× cheaper.
            x_adv = pgd_eot_examples(counted_classifier, x, y, idx, eps=s.eps, steps=s.pgd_steps,
                                     step_size=s.pgd_step_size, eot=1, seed=s.seed)
            out["classifier_pgd_eot"] = _flags(classifier_flags(classifier, x_adv, y) & clean)
    if "carso" in s.targets and carso is not None and counted_carso is not None:
        clean_r = draw_flags(carso, x, y, idx, s.seed, STREAM_CLEAN_REPEATS, s.repeats)
        clean = draw_flags(carso, x, y, idx, s.seed, STREAM_CLEAN)[0]
        out["carso_clean"] = _flags(clean)
        out["carso_clean_repeats"] = [_flags(r) for r in clean_r]
        x_adv = None
        if s.attack == "autoattack":
            # The library's z come from the global RNG: the standard sampler, not the seeded one.
            res = autoattack_flags(counted_carso, x, y, eps=s.eps, version="rand",
                                   seed=example_seed(s.seed, "carso", idx[0], bits=31),
                                   device=device, steps=s.aa_steps, eot=s.aa_eot)
            out["carso_randaa_library"] = _flags(res.flags)
            out["carso_randaa"] = _flags(res.flags & clean)
            x_adv, key = res.candidates, "carso_randaa"
            warnings += [f"carso: {w}" for w in res.warnings]
        elif s.attack == "pgd-eot":
            x_adv = pgd_eot_examples(counted_carso, x, y, idx, eps=s.eps, steps=s.pgd_steps,
                                     step_size=s.pgd_step_size, eot=s.pgd_eot, seed=s.seed)
            single = draw_flags(carso, x_adv, y, idx, s.seed, STREAM_ADV)[0]
            out["carso_pgd_eot"] = _flags(single & clean)
            key = "carso_pgd_eot"
        if x_adv is not None:
            reps = draw_flags(carso, x_adv, y, idx, s.seed, STREAM_ADV_REPEATS, s.repeats)
            out[f"{key}_repeats"] = [_flags(r) for r in reps]
    out["warnings"] = warnings
    return out


@dataclass
class EvalOutcome:
    results: dict[str, Any] | None  # the results file's content (main process), else None
    path: Path | None
    computed: int  # batches computed by this process
    resumed: int  # batches found on disk by this process


def library_versions() -> dict[str, str]:
    import numpy
    import pyautoattack

    versions = {
        "carso": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyautoattack": getattr(pyautoattack, "__version__", "?"),
        "numpy": numpy.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


# Table 2's columns (AT = the adversarially-trained classifier alone, C = CARSO) and our extra one.
COLUMNS = [
    ("AT/Cl", "classifier_clean"),
    ("C/Cl", "carso_clean"),
    ("AT/AA", "classifier_aa"),
    ("C/randAA", "carso_randaa"),
    ("AT/PGD+EoT", "classifier_pgd_eot"),
    ("PGD+EoT", "carso_pgd_eot"),
]


def summarize(flags: dict[str, list[Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics per Table 2 column, re-classification report) from the merged per-example flags."""
    metrics: dict[str, Any] = {}
    for column, key in COLUMNS:
        if key in flags:
            v = flags[key]
            metrics[column] = {"key": key, "correct": int(sum(v)), "total": len(v),
                               "accuracy": sum(v) / max(len(v), 1)}
    report: dict[str, Any] = {}
    for name, key in (("clean", "carso_clean"), ("randAA", "carso_randaa"), ("PGD+EoT", "carso_pgd_eot")):
        reps = flags.get(f"{key}_repeats")
        if not reps or key not in flags:
            continue
        t = torch.tensor(reps, dtype=torch.float64)  # (R, N)
        per_draw = t.mean(dim=1)
        single = torch.tensor(flags[key], dtype=torch.bool)
        worst = single & t.bool().all(dim=0)  # robust only if the single draw and all R draws are right
        report[name] = {
            "single": float(single.double().mean()),
            "mean": float(per_draw.mean()),
            "std": float(per_draw.std(unbiased=True)) if t.shape[0] > 1 else 0.0,
            "worst": float(worst.double().mean()),
            "worst_correct": int(worst.sum()),
            "repeats": int(t.shape[0]),
            "total": int(t.shape[1]),
        }
    return metrics, report


def merge_records(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Concatenate per-batch flags in example order (``*_repeats``: along the example axis)."""
    records = sorted(records, key=lambda r: r["start"])
    merged: dict[str, list[Any]] = {}
    for r in records:
        for key, value in r["flags"].items():
            if key == "warnings":
                continue
            if key.endswith("_repeats"):
                rows = merged.setdefault(key, [[] for _ in value])
                for row, part in zip(rows, value):
                    row.extend(part)
            else:
                merged.setdefault(key, []).extend(value)
    return merged


def evaluate(
    classifier: nn.Module,
    carso: CARSO | None,
    dataset: Any,
    settings: EvalSettings,
    store: ResultsStore,
    ctx: distributed.DistContext,
    *,
    run: Path | None = None,
    progress: Any = None,
    console: Any = None,
    extra: dict[str, Any] | None = None,
) -> EvalOutcome:
    """Evaluate the first ``settings.n_examples`` examples of ``dataset``; rank 0 writes the results.

    Every process takes a contiguous range of whole batches; finished batches are skipped with
    ``store.resume``. ``progress`` (a rich Progress, main process) gets an example-level task and a
    per-batch task counting forward passes.
    """
    s = settings
    s.validate()
    device = ctx.device
    store.check()
    if ctx.is_main:
        store.prepare()
    distributed.barrier(ctx)
    started = time.time()
    batches = batch_ranges(s.n_examples, s.batch_size)
    mine = distributed.shard(len(batches), ctx.rank, ctx.world_size)
    model: nn.Module | None = carso
    if carso is not None and s.precision == "bfloat16":
        model = Autocast(carso, device)
    n_mine = sum(len(batches[k]) for k in mine)
    task = progress.add_task("examples", total=n_mine) if progress is not None else None
    calls = progress.add_task("forward passes", total=None, visible=False) if progress is not None else None
    records: list[dict[str, Any]] = []
    computed = resumed = 0
    with library_logging(console if ctx.is_main else None):
        for k in mine:
            rng = batches[k]
            record = store.load(k)
            if record is None:
                x, y = load_examples(dataset, rng)
                x, y = x.to(device), y.to(device)
                if progress is not None:
                    progress.reset(calls, total=expected_calls(s), visible=True,
                                   description=f"batch {k + 1}/{len(batches)} — forward passes")
                tick = (lambda: progress.advance(calls)) if progress is not None else None
                t0 = time.time()
                flags = evaluate_batch(classifier, model, x, y, rng, s, device, on_call=tick)
                record = {"batch": k, "start": rng.start, "stop": rng.stop, "settings": store.settings,
                          "flags": flags, "wall_s": round(time.time() - t0, 3), "rank": ctx.rank}
                store.save(k, record)
                computed += 1
            else:
                resumed += 1
            records.append(record)
            if progress is not None:
                progress.advance(task, len(rng))
    if progress is not None:
        progress.update(calls, visible=False)
    gathered = distributed.gather_objects(records, ctx)
    if not ctx.is_main or gathered is None:
        return EvalOutcome(None, None, computed, resumed)
    all_records = [r for part in gathered for r in part]
    flags = merge_records(all_records)
    metrics, report = summarize(flags)
    warnings = sorted({w for r in all_records for w in r["flags"].get("warnings", [])})
    results = {
        "format": RESULTS_FORMAT,
        "name": store.dir.name,
        "run": str(run) if run is not None else None,
        "settings": store.settings,
        "seed": s.seed,
        "n_examples": s.n_examples,
        "batches": len(batches),
        "metrics": metrics,
        "reclassification": report,
        "flags": flags,
        "library_warnings": warnings,
        "wall_time_s": round(sum(r["wall_s"] for r in all_records), 3),
        "elapsed_s": round(time.time() - started, 3),
        "processes": ctx.world_size,
        "device": str(device),
        "versions": library_versions(),
        "notes": [
            "A robust flag is set only when the clean flag (same model, single draw) is set too.",
            (
                "CARSO's clean, re-classification and PGD+EoT draws are seeded per example (independent of "
                "batching and processes); AutoAttack's internal randomness is seeded per batch, so its "
                "results depend on the batch size but not on the number of processes."
            ),
            "reclassification.*.worst: robust only if the single draw and all repeats are right.",
        ],
        **(extra or {}),
    }
    path = store.dir / RESULTS_FILE
    ckpt.atomic_write_text(path, dumps_compact(results))
    return EvalOutcome(results, path, computed, resumed)


def load_examples(dataset: Any, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``dataset[i]`` for i in ``indices`` → x (B, C, H, W) float32, y (B,) int64."""
    xs, ys = [], []
    for i in indices:
        x, y = dataset[i]
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(int(y))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Cost estimate (a warning before a run that would take days)
# --------------------------------------------------------------------------------------------------


def expected_calls(s: EvalSettings) -> int | None:
    """Forward passes ``evaluate_batch`` makes through the attacked models (None when unknown).

    randAA: the library's clean pass and two checks, then per APGD run one clean pass, (steps + 1)
    EoT-averaged gradients and a final pass (an upper bound: APGD-DLR is skipped when nothing is left).
    The standard version's count depends on how many examples each attack leaves: unknown.
    """
    total = 0
    if "classifier" in s.targets:
        if s.attack == "autoattack":
            return None
        total += s.pgd_steps if s.attack == "pgd-eot" else 0
    if "carso" in s.targets:
        if s.attack == "autoattack":
            total += 3 + 2 * (2 + s.aa_eot * (s.aa_steps + 1))
        elif s.attack == "pgd-eot":
            total += s.pgd_steps * s.pgd_eot
    return total or None


def passes_per_example(s: EvalSettings, num_classes: int) -> tuple[float, float]:
    """(CARSO, classifier) forward+backward passes per example — an upper bound for AutoAttack."""
    carso = classifier = 0.0
    if "carso" in s.targets:
        if s.attack == "autoattack":
            carso = 2 * (s.aa_eot * (s.aa_steps + 1) + 2)  # APGD-CE and APGD-DLR
        elif s.attack == "pgd-eot":
            carso = s.pgd_steps * s.pgd_eot
        carso += 2 * s.repeats / 3  # re-classification: forwards only (~⅓ of a forward+backward)
    if "classifier" in s.targets:
        targets = min(9, num_classes - 1)
        if s.attack == "autoattack":
            # APGD-CE, APGD-T (9 targets), FAB-T (9 targets, ~2 passes a step), Square (forwards).
            classifier = (s.aa_steps + 2) * (1 + targets + 2 * targets) + s.square_queries / 3
        elif s.attack == "pgd-eot":
            classifier = s.pgd_steps
    return carso, classifier


def probe_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds for one forward+backward of ``model`` on ``x`` (after one warm-up)."""
    for i in range(2):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        input_gradient(model, x, y)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        dt = time.perf_counter() - t0
    return dt


def estimate_seconds(
    classifier: nn.Module, carso: nn.Module | None, x: torch.Tensor, y: torch.Tensor, s: EvalSettings,
    num_classes: int, world_size: int = 1,
) -> float:
    """A rough wall-time estimate of the whole evaluation, from timing one pass on ``x``."""
    n_carso, n_classifier = passes_per_example(s, num_classes)
    per_carso = probe_seconds(carso, x, y) / x.shape[0] if carso is not None and n_carso else 0.0
    per_classifier = probe_seconds(classifier, x, y) / x.shape[0] if n_classifier else 0.0
    return s.n_examples * (n_carso * per_carso + n_classifier * per_classifier) / max(world_size, 1)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
