"""The sanity checks an honest robustness claim needs, as library functions (``carso sanity`` is their wiring).

Each check takes the models, fixed batches of examples and the settings (``CheckInputs``) and returns a
``CheckResult`` (pass / fail / warn, what was measured against what threshold); ``CHECKS`` maps each
name to its function, in the order they run (AutoAttack's ``autoattack/checks.py`` is the model):

1. **large-eps** — CARSO under the randomized AutoAttack at ε = 0.95 must be at most chance (1/C)
   plus a tolerance (the paper's Table 3): otherwise the attack is not working, not the defence.
2. **gradients** — input gradients of randAA's losses (CE and DLR) over examples and stochastic draws:
   the fraction of entries that are zero or non-finite, and of gradients that are useless for a sign
   step (entirely zero, or with a non-finite entry). Majority-vote aggregation fails here (the later
   version's Table 5: > 99 % of its gradients are zero or NaN); the paper's aggregation passes.
3. **monotonic** — robust accuracy under short PGD+EoT does not rise with ε beyond noise.
4. **eot** — agreement (cosine) of two independent EoT gradient estimates; a warning when low.
5. **blackbox** — neither the Square attack nor a transfer attack (PGD against the classifier alone, fed
   to CARSO) is markedly stronger than the end-to-end white-box attack (the same PGD+EoT budget):
   if one were, the white-box gradients would be masked.
6. **saturation** — the fraction of examples whose cross-entropy input gradient is numerically useless
   (zero, non-finite, or not the direction of its float64 recomputation; ``evaluation.saturation``)
   on the paper's ``dexp`` surface and on ``dexp-logsum`` (the same decision): fails when the
   paper's surface is saturated above the threshold while ``dexp-logsum`` is not — cross-entropy attacks
   on the paper's surface are then blunted, and ``carso eval --attack adaptive`` is the remedy.
7. **indicators** — the attack-failure indicators (Pintor et al. 2022) that ``carso eval --attack adaptive``
   stored for this run (``RUN/eval/NAME/results.json``, ``--eval NAME``): fails when one failed; a warning
   when there is no such evaluation, or it was made with other weights.

Every stochastic draw is seeded per example (``evaluation.ExampleSeededSampler``).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from carso_cli import checkpoint as ckpt
from carso_cli import evaluation as ev
from carso_cli.config import Config, parse_eps
from carso_cli.errors import CarsoError
from carso_cli.evaluation.settings import AttackBudget, at_least_one, in_unit_interval

# The monotonicity check's ε sweep, as --eps-list writes it.
EPS_LIST = "2/255,4/255,8/255,16/255"


@dataclass
class SanitySettings(AttackBudget):
    """What the checks run with; thresholds included (all stored in the JSON report). The shared fields
    (``AttackBudget``) default to short attacks: the checks compare attacks, they do not measure robustness."""

    checks: list[str] = field(default_factory=lambda: list(CHECKS))
    n_examples: int | None = 256
    # 1. large ε: randAA at ε = 0.95 (Table 3), with aa_steps APGD steps and aa_eot EoT iterations.
    large_eps: float = 0.95
    aa_steps: int = 20
    chance_tolerance: float = 0.05
    # 2. gradient health.
    draws: int = 4
    max_bad_entries: float = 0.5
    max_bad_gradients: float = 0.1
    # 3./5. short PGD+EoT (the white-box reference: pgd_steps, pgd_eot at eps) and its ε sweep.
    eps_list: list[float] = field(default_factory=lambda: parse_eps_list(EPS_LIST))
    pgd_steps: int = 20
    pgd_eot: int = 5
    monotonic_tolerance: float = 0.05
    # 4. EoT stability.
    min_eot_cosine: float = 0.5
    # 5. black-box attacks (Square with square_queries).
    square_queries: int = 1000
    blackbox_tolerance: float = 0.05
    # 6. gradient saturation of the paper's surface: saturation_threshold.
    # 7. the attack-failure indicators of this evaluation (RUN/eval/NAME).
    eval_name: str = "adaptive"

    @classmethod
    def preset_defaults(cls, cfg: Config) -> dict[str, Any]:
        """The preset's, with PGD+EoT capped at the short defaults; ε = ``attacks.sanity_eps`` for large-eps."""
        a = cfg.attacks
        short = {"pgd_steps": min(a.pgd_eot_steps, 20), "pgd_eot": min(a.pgd_eot_iterations, 5)}
        return {**super().preset_defaults(cfg), **short, "large_eps": a.sanity_eps}

    def validate(self) -> None:
        super().validate()
        at_least_one(self, ("draws",))
        parse_checks(",".join(self.checks))
        in_unit_interval(self, ("large_eps",))
        _check_increasing(self.eps_list)


@dataclass
class CheckResult:
    key: str
    title: str
    status: str  # "pass", "fail", "warn"
    measured: str
    threshold: str
    details: dict[str, Any] = field(default_factory=dict)


def noise(p: float, q: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies p, q measured on n examples each."""
    return 2.0 * math.sqrt(max(p * (1 - p) + q * (1 - q), 0.0) / max(n, 1))


def parse_checks(text: str | None) -> list[str]:
    if text is None or text.strip() in ("", "all"):
        return list(CHECKS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in CHECKS:
            raise CarsoError(f"unknown check '{name}' (choose from {', '.join(CHECKS)}, or 'all')")
    return names


def parse_eps_list(text: str) -> list[float]:
    values = [parse_eps(t.strip(), "--eps-list") for t in text.split(",") if t.strip()]
    _check_increasing(values)
    return values


def _check_increasing(eps_list: list[float]) -> None:
    """The ε sweep of the monotonicity check: at least two radii, strictly increasing."""
    if len(eps_list) < 2 or any(b <= a for a, b in itertools.pairwise(eps_list)):
        raise CarsoError("--eps-list needs at least two increasing values, e.g. 2/255,4/255,8/255,16/255")


Batches = list[tuple[torch.Tensor, torch.Tensor, range]]


@dataclass
class CheckInputs:
    """What every check reads: CARSO and its classifier, fixed batches (x (B, C, H, W), y (B,), test-set
    indices), the settings; and the pieces several checks share, computed once (``clean``, ``pgd_accuracy``)."""

    carso: torch.nn.Module
    classifier: torch.nn.Module
    batches: Batches
    s: SanitySettings
    num_classes: int
    device: torch.device
    tick: Callable[[str], None] = lambda _label: None  # one unit of work done (the progress display)
    run: Path | None = None
    _clean: list[torch.Tensor] | None = None
    _pgd: dict[float, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(len(idx) for _, _, idx in self.batches)

    def clean(self) -> list[torch.Tensor]:
        """CARSO's single-draw clean correctness per batch (robust flags are ANDed with it)."""
        if self._clean is None:
            self._clean = [
                ev.draw_flags(self.carso, x, y, idx, self.s.seed, ev.STREAM_CLEAN)[0] for x, y, idx in self.batches
            ]
        return self._clean

    def pgd_accuracy(self, eps: float) -> float:
        """Robust accuracy of CARSO under short PGD+EoT at ``eps`` (single seeded draw)."""
        if eps not in self._pgd:
            correct = 0
            for (x, y, idx), clean in zip(self.batches, self.clean()):
                x_adv = ev.pgd_eot_examples(
                    self.carso,
                    x,
                    y,
                    idx,
                    eps=eps,
                    steps=self.s.pgd_steps,
                    step_size=self.s.pgd_step_size,
                    eot=self.s.pgd_eot,
                    seed=self.s.seed,
                )
                flags = ev.draw_flags(self.carso, x_adv, y, idx, self.s.seed, ev.STREAM_ADV)[0] & clean
                correct += int(flags.sum())
                self.tick(f"PGD+EoT ε={eps:.4f}")
            self._pgd[eps] = correct / self.n
        return self._pgd[eps]


# the checks ---------------------------------------------------------------------------------------


def large_eps(c: CheckInputs) -> CheckResult:
    s = c.s
    correct = 0
    warnings: list[str] = []
    for _k, ((x, y, idx), clean) in enumerate(zip(c.batches, c.clean())):
        res = ev.autoattack_flags(
            c.carso,
            x,
            y,
            eps=s.large_eps,
            version="rand",
            seed=ev.example_seed(s.seed, "sanity", idx[0], bits=31),
            device=c.device,
            steps=s.aa_steps,
            eot=s.aa_eot,
        )
        correct += int((res.flags & clean).sum())
        warnings += res.warnings
        c.tick("randAA at large ε")
    acc = correct / c.n
    limit = 1.0 / c.num_classes + s.chance_tolerance
    return CheckResult(
        "large-eps",
        f"randAA at ε = {s.large_eps:g} ≤ chance",
        "pass" if acc <= limit else "fail",
        f"{100 * acc:.2f}%",
        f"≤ {100 * limit:.2f}%",
        {
            "accuracy": acc,
            "correct": correct,
            "total": c.n,
            "chance": 1.0 / c.num_classes,
            "limit": limit,
            "library_warnings": sorted(set(warnings)),
        },
    )


def gradients(c: CheckInputs) -> CheckResult:
    s = c.s
    stats = {loss: ev.GradientStats() for loss in ev.LOSSES}
    for x, y, idx in c.batches:
        for loss in ev.LOSSES:
            stats[loss] = stats[loss] + ev.gradient_health(c.carso, x, y, idx, draws=s.draws, seed=s.seed, loss=loss)
        c.tick("gradient health")
    healthy = {
        loss: st.bad_entry_fraction <= s.max_bad_entries and st.bad_gradient_fraction <= s.max_bad_gradients
        for loss, st in stats.items()
    }
    # An attack with one healthy loss still works (randAA runs both): fail only when none is;
    # warn when one is masked (e.g. CE saturating on very confident scores).
    status = "pass" if all(healthy.values()) else "warn" if any(healthy.values()) else "fail"
    measured = ", ".join(
        f"{loss.upper()} {100 * st.bad_entry_fraction:.1f}% / {100 * st.bad_gradient_fraction:.1f}%"
        for loss, st in stats.items()
    )
    return CheckResult(
        "gradients",
        "gradient health",
        status,
        measured,
        f"≤ {100 * s.max_bad_entries:.0f}% entries / ≤ {100 * s.max_bad_gradients:.0f}% grads",
        {loss: {**st.to_json(), "healthy": healthy[loss]} for loss, st in stats.items()},
    )


def monotonic(c: CheckInputs) -> CheckResult:
    s = c.s
    accs = [c.pgd_accuracy(e) for e in s.eps_list]
    rises = []
    for (e0, a0), (e1, a1) in itertools.pairwise(zip(s.eps_list, accs)):
        allowed = s.monotonic_tolerance + noise(a0, a1, c.n)
        if a1 - a0 > allowed:
            rises.append({"from_eps": e0, "to_eps": e1, "rise": a1 - a0, "allowed": allowed})
    measured = " → ".join(f"{100 * a:.1f}%" for a in accs)
    return CheckResult(
        "monotonic",
        "ε-monotonicity (PGD+EoT)",
        "fail" if rises else "pass",
        measured,
        f"rise ≤ {100 * s.monotonic_tolerance:.0f}% + noise",
        {"eps": s.eps_list, "accuracy": accs, "rises": rises, "steps": s.pgd_steps, "eot": s.pgd_eot},
    )


def eot(c: CheckInputs) -> CheckResult:
    s = c.s
    cos: dict[str, list[torch.Tensor]] = {loss: [] for loss in ev.LOSSES}
    for x, y, idx in c.batches:
        for loss in ev.LOSSES:
            cos[loss].append(ev.eot_agreement(c.carso, x, y, idx, eot=s.pgd_eot, seed=s.seed, loss=loss))
        c.tick("EoT stability")
    means = {loss: float(torch.cat(v).mean()) for loss, v in cos.items()}
    low = [loss for loss, m in means.items() if m < s.min_eot_cosine]
    return CheckResult(
        "eot",
        "EoT stability (cosine)",
        "warn" if low else "pass",
        ", ".join(f"{loss.upper()} {m:.3f}" for loss, m in means.items()),
        f"≥ {s.min_eot_cosine:g} (warning only)",
        {
            "mean_cosine": means,
            "min_cosine": {k: float(torch.cat(v).min()) for k, v in cos.items()},
            "low": low,
            "hint": "raise --eot (EoT iterations) if low" if low else "",
        },
    )


def blackbox(c: CheckInputs) -> CheckResult:
    from carso_cli.attacks import pgd

    s = c.s
    white = c.pgd_accuracy(s.eps)
    square = transfer = 0
    warnings: list[str] = []
    for (x, y, idx), clean in zip(c.batches, c.clean()):
        res = ev.autoattack_flags(
            c.carso,
            x,
            y,
            eps=s.eps,
            version="custom",
            attacks=["square"],
            seed=ev.example_seed(s.seed, "square", idx[0], bits=31),
            device=c.device,
            square_queries=s.square_queries,
        )
        square += int((res.flags & clean).sum())
        warnings += res.warnings
        # Transfer: the same PGD budget against the classifier alone, then fed to CARSO.
        gen = torch.Generator().manual_seed(ev.example_seed(s.seed, "transfer", idx[0], bits=31))
        x_t = pgd(c.classifier, x, y, s.eps, s.pgd_steps, s.pgd_step_size, random_start=True, generator=gen)
        transfer += int((ev.draw_flags(c.carso, x_t, y, idx, s.seed, ev.STREAM_ADV)[0] & clean).sum())
        c.tick("black-box attacks")
    acc_sq, acc_tr = square / c.n, transfer / c.n
    stronger = []
    for name, acc in (("square", acc_sq), ("transfer", acc_tr)):
        allowed = s.blackbox_tolerance + noise(white, acc, c.n)
        if white - acc > allowed:
            stronger.append({"attack": name, "accuracy": acc, "white_box": white, "allowed": allowed})
    return CheckResult(
        "blackbox",
        "white-box vs black-box",
        "fail" if stronger else "pass",
        f"white {100 * white:.1f}%, square {100 * acc_sq:.1f}%, transfer {100 * acc_tr:.1f}%",
        f"≥ white − {100 * s.blackbox_tolerance:.0f}% − noise",
        {
            "white_box": white,
            "square": acc_sq,
            "transfer": acc_tr,
            "eps": s.eps,
            "queries": s.square_queries,
            "stronger": stronger,
            "library_warnings": sorted(set(warnings)),
        },
    )


def saturation(c: CheckInputs) -> CheckResult:
    s = c.s
    fractions: dict[str, float] = {}
    for name in ev.SURFACES:
        count = 0
        with ev.surface(c.carso, name):
            for x, y, idx in c.batches:
                count += int(ev.saturated_flags(c.carso, x, y, idx, seed=s.seed).bool().sum())
        fractions[name] = count / c.n
        c.tick("gradient saturation")
    paper, logsum = fractions[ev.PAPER_SURFACE], fractions[ev.LOGSUM_SURFACE]
    above = paper > s.saturation_threshold
    # Saturated where the logsum surface is not: the paper's surface hides robustness that is not there.
    status = "fail" if above and logsum <= s.saturation_threshold else "warn" if above else "pass"
    hint = (
        "cross-entropy attacks on the paper's surface are blunted: evaluate with "
        "`carso eval --attack adaptive` (the default), which attacks the same decision through dexp-logsum"
        if above
        else ""
    )
    return CheckResult(
        "saturation",
        "CE-gradient saturation (dexp vs dexp-logsum)",
        status,
        ", ".join(f"{name} {100 * f:.1f}%" for name, f in fractions.items()),
        f"dexp ≤ {100 * s.saturation_threshold:.0f}% of examples",
        {"fraction": fractions, "threshold": s.saturation_threshold, "hint": hint},
    )


def indicators(c: CheckInputs) -> CheckResult:
    title = f"attack-failure indicators (eval/{c.s.eval_name})"
    why, block = stored_indicators(c.run, c.s.eval_name) if c.run is not None else ("no run", None)
    if block is None:
        return CheckResult("indicators", title, "warn", "not evaluated", "none failed", {"hint": why})
    failed = block["failed"]
    hint = (
        ("an attack may have failed silently (see `carso eval`'s indicator table and the README): " + "; ".join(failed))
        if failed
        else ""
    )
    return CheckResult(
        "indicators",
        title,
        "fail" if failed else "pass",
        f"{len(failed)} failed" + (f": {', '.join(failed[:3])}" if failed else ""),
        "none failed",
        {"failed": failed, "attacks": block["attacks"], "examples": block["examples"], "hint": hint},
    )


def stored_indicators(run: Path, name: str) -> tuple[str, dict[str, Any] | None]:
    """(why not, or "") and the ``indicators`` block of RUN/eval/NAME/results.json, if made with these weights."""
    path = run / "eval" / name / ev.RESULTS_FILE
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"no readable {path}: run `carso eval` (--attack adaptive) first", None
    settings = results.get("settings") or {}
    weights = {
        "classifier_sha256": ckpt.sha256_file(ckpt.classifier_path_of(run)),
        "purifier_sha256": ckpt.sha256_file(run / ckpt.PURIFIER_FILE),
    }
    if any(settings.get(k) not in ("", None, v) for k, v in weights.items()):
        return f"{path} was made with other weights: evaluate again", None
    if not results.get("indicators"):
        return f"{path} has no indicators (--attack adaptive without --no-indicators makes them)", None
    return "", results["indicators"]


CHECKS: dict[str, Callable[[CheckInputs], CheckResult]] = {
    "large-eps": large_eps,
    "gradients": gradients,
    "monotonic": monotonic,
    "eot": eot,
    "blackbox": blackbox,
    "saturation": saturation,
    "indicators": indicators,
}


def run_checks(inputs: CheckInputs, names: list[str]) -> list[CheckResult]:
    """The checks ``names`` on ``inputs``, in ``CHECKS``'s order."""
    return [check(inputs) for key, check in CHECKS.items() if key in names]
