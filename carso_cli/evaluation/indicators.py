"""Attack-failure indicators (Pintor et al., "Indicators of Attack Failure", NeurIPS 2022), per attack.

A robust example is evidence only if the attack that left it could have broken it. Each indicator is a
small check of one way an attack fails silently; computed for every attack of the adaptive evaluation
(``--attack adaptive``), stored in results.json (``indicators``) and printed under the per-attack table:

- ``reproduction`` — every break is reproduced by the evaluated model on the stored point, with the
  decision's own seeded draws. A break that is not is a bug of the evaluation (an example counted as
  broken by a model other than the one evaluated), not a finding. randAA's verdict is the library's
  single draw from the global RNG (the paper's protocol): its breaks that no seeded draw reproduces are
  listed apart (``library_draw_only``), not failed.
- ``unbounded`` — the attack at ε = 0.5 (reduced steps, on the first ``--indicator-examples``) must break
  (about) every example: every image in [0, 1] lies within 0.5 of the grey image, so an attack that
  cannot is blind on this model (Pintor's "unbounded attack").
- ``convergence`` — the examples the attack left, attacked again with 2× steps and 2× EoT: it fails when
  the doubled budget breaks examples beyond the noise of the ``--repeats`` re-classifications, or raises
  the attack loss (DLR, scale-free, EoT-averaged on the evaluated model) beyond its noise.
- ``transfer`` — transfer and black-box attacks break examples that every white-box attack left: the
  white-box gradients are not useful on this model (AutoAttack's own check of Square against APGD).
- ``eot_noise`` — the mean cosine similarity ρ of single-draw input gradients on the attack's surface,
  and the EoT count it implies: the mean of K draws has an expected cosine with another such mean of
  Kρ / (1 + (K−1)ρ) (draws = a common direction + independent noise), so K = c(1−ρ) / (ρ(1−c)) reaches
  ``EOT_TARGET_COSINE`` = c. It fails when that K exceeds the attack's EoT iterations.

The extra cost is bounded by ``--indicator-examples`` (the first N examples of the evaluation, whatever
the batching); ``reproduction`` (a few forwards per break) and ``transfer`` (from the flags) cover every
example. Each indicator is a dataclass of counts that batches sum (``+``), ``status`` "pass"/"fail"/"n/a".
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from carso_cli.evaluation.adaptive import run_candidates
from carso_cli.evaluation.gradients import dlr_loss, input_gradient
from carso_cli.evaluation.saturation import LOGSUM_SURFACE, paper_surface, surface
from carso_cli.evaluation.seeding import (
    STREAM_ADV,
    STREAM_ADV_REPEATS,
    STREAM_GRADIENTS,
    ExampleSeededSampler,
    draw_flags,
    seeded_latents,
)
from carso_cli.evaluation.settings import EvalSettings

UNBOUNDED_EPS = 0.5
UNBOUNDED_TOLERANCE = 0.1  # at most this fraction of the examples may survive the unbounded attack
LOSS_TOLERANCE = 0.05  # a mean DLR rise (DLR lies in about [-1, 1]) below this is not "still rising"
EOT_TARGET_COSINE = 0.8  # two independent EoT estimates should agree at least this well
EOT_DRAWS = 4  # single-draw gradients per example for ρ (6 pairs)
# End-to-end gradient attacks on the decision, and the attacks that reach it another way: transfers, the
# black box, and (issue 20) the representation (a feature-space objective) and z held fixed (a
# deterministic surrogate judged on fresh draws). One of the latter breaking what every white-box attack
# left says the end-to-end gradients are not useful on this model.
WHITE_BOX = ("randaa", "randaa-logsum", "pgd-eot-logsum", "selective-eot", "apgd-t-eot", "pgd-cw-eot")
TRANSFERS = ("transfer-classifier", "transfer-logit", "representation", "fixed-randomness", "square")
# Gradient attacks on CARSO: the surface they attack (None: the model's own) and the losses they use.
GRADIENT_SURFACES: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "randaa": (None, ("ce", "dlr")),  # None here: the paper's surface (``saturation.paper_surface``)
    "randaa-logsum": (LOGSUM_SURFACE, ("ce", "dlr")),
    "pgd-eot-logsum": (LOGSUM_SURFACE, ("ce",)),
    "transfer-logit": ("logit", ("ce", "dlr")),
    # Margin losses (targeted DLR, CW): DLR's noise stands for theirs. Selective EoT ascends single
    # draws' margins, whatever the aggregation: the model's own surface.
    "apgd-t-eot": (LOGSUM_SURFACE, ("dlr",)),
    "pgd-cw-eot": (LOGSUM_SURFACE, ("dlr",)),
    "selective-eot": (None, ("dlr",)),
}
PGD_EOT = ("pgd-eot-logsum", "pgd-cw-eot", "selective-eot")  # their EoT is PGD+EoT's (``pgd_eot``), not randAA's
TITLES = {
    "reproduction": "breaks not reproduced",
    "unbounded": f"left at ε = {UNBOUNDED_EPS:g}",
    "convergence": "2× steps and EoT",
    "transfer": "transfer > white-box",
    "eot_noise": "EoT noise",
}
SETTING = {"setting": True}  # a field that batches share rather than sum

AttackFn = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]  # (x, y, indices) → points (K, B, …)


class _Indicator:
    """Counts summed over batches (``+``); settings fields are kept. ``status``: pass / fail / n/a."""

    def __add__(self, other: Any) -> Any:
        kw = {
            f.name: getattr(self, f.name)
            if f.metadata.get("setting")
            else getattr(self, f.name) + getattr(other, f.name)
            for f in fields(self)
        }  # type: ignore[arg-type]
        return type(self)(**kw)

    @property
    def status(self) -> str:
        raise NotImplementedError

    def measured(self) -> str:
        raise NotImplementedError

    @property
    def failed(self) -> bool:
        return self.status == "fail"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status, "measured": self.measured()}  # type: ignore[call-overload]


@dataclass
class Reproduction(_Indicator):
    breaks: int = 0
    not_reproduced: list[int] = field(default_factory=list)  # dataset indices: a bug of the evaluation
    library_draw_only: list[int] = field(default_factory=list)  # randAA: broken by the library's draw alone

    @property
    def status(self) -> str:
        return "fail" if self.not_reproduced else "pass"

    def measured(self) -> str:
        extra = f" (+{len(self.library_draw_only)} lib. draw)" if self.library_draw_only else ""
        return f"{len(self.not_reproduced)}/{self.breaks}{extra}"


@dataclass
class Unbounded(_Indicator):
    attacked: int = 0
    survived: int = 0
    eps: float = field(default=UNBOUNDED_EPS, metadata=SETTING)
    tolerance: float = field(default=UNBOUNDED_TOLERANCE, metadata=SETTING)

    @property
    def status(self) -> str:
        if not self.attacked:
            return "n/a"
        return "fail" if self.survived > self.tolerance * self.attacked else "pass"

    def measured(self) -> str:
        return f"{self.survived}/{self.attacked}" if self.attacked else "n/a"


@dataclass
class Convergence(_Indicator):
    examples: int = 0  # clean-correct examples of the subset
    survivors: int = 0  # of them, left by the attack: attacked again with the doubled budget
    broken: int = 0  # survivors the doubled budget broke
    decision_var: float = 0.0  # Σ q(1−q), q = P(robust) from the draws at the doubled point
    loss: float = 0.0  # Σ over survivors of the EoT-mean DLR at the attack's point
    loss_doubled: float = 0.0  # … at the doubled budget's point
    loss_var: float = 0.0  # Σ of the variances of those two means

    @property
    def drop(self) -> float:
        """Robust accuracy lost on the subset by doubling the budget."""
        return self.broken / max(self.examples, 1)

    @property
    def noise(self) -> float:
        """Two standard deviations of that drop from re-drawing the --repeats draws alone."""
        return 2.0 * math.sqrt(self.decision_var) / max(self.examples, 1)

    @property
    def loss_rise(self) -> float:
        return (self.loss_doubled - self.loss) / max(self.survivors, 1)

    @property
    def loss_noise(self) -> float:
        return 2.0 * math.sqrt(self.loss_var) / max(self.survivors, 1)

    @property
    def status(self) -> str:
        if not self.survivors:
            return "n/a"
        rising = self.loss_rise > max(LOSS_TOLERANCE, self.loss_noise)
        return "fail" if self.drop > self.noise or rising else "pass"

    def measured(self) -> str:
        if not self.survivors:
            return "n/a"
        drop = f"−{100 * self.drop:.1f}" if self.broken else "0"
        return f"{drop} pts ({self.broken}/{self.survivors}), DLR {self.loss_rise:+.2f}"


@dataclass
class Transfer(_Indicator):
    examples: int = 0  # every example evaluated
    broken: int = 0  # broken by this transfer/black-box attack though every white-box attack left it

    @property
    def status(self) -> str:
        return "fail" if self.broken else "pass"

    def measured(self) -> str:
        return f"{self.broken}/{self.examples}"


@dataclass
class EotNoise(_Indicator):
    gradients: int = 0  # examples × losses with a usable gradient in every draw
    undefined: int = 0  # … with a zero or non-finite gradient in some draw (no direction to agree on)
    cosine: float = 0.0  # Σ of the per-example mean pairwise cosines
    eot: int = field(default=1, metadata=SETTING)  # the attack's EoT iterations
    target: float = field(default=EOT_TARGET_COSINE, metadata=SETTING)

    @property
    def rho(self) -> float:
        return self.cosine / max(self.gradients, 1)

    @property
    def implied_eot(self) -> float:
        return implied_eot(self.rho, self.target)

    @property
    def status(self) -> str:
        if not self.gradients:
            return "n/a"
        return "fail" if self.implied_eot > self.eot else "pass"

    def measured(self) -> str:
        if not self.gradients:
            return "n/a" if not self.undefined else f"no gradient ({self.undefined})"
        k = self.implied_eot
        return f"ρ {self.rho:.2f}: {'∞' if math.isinf(k) else math.ceil(k)} EoT (runs {self.eot})"

    def to_json(self) -> dict[str, Any]:
        k = self.implied_eot
        return {**super().to_json(), "mean_cosine": self.rho, "implied_eot": None if math.isinf(k) else math.ceil(k)}


INDICATOR_TYPES: dict[str, type[_Indicator]] = {
    "reproduction": Reproduction,
    "unbounded": Unbounded,
    "convergence": Convergence,
    "transfer": Transfer,
    "eot_noise": EotNoise,
}


# --------------------------------------------------------------------------------------------------
# The indicators, each on one batch
# --------------------------------------------------------------------------------------------------


def as_stack(points: torch.Tensor) -> torch.Tensor:
    """Candidate points as a stack (K, B, C, H, W): one point per example (B, C, H, W) is K = 1."""
    return points if points.dim() == 5 else points.unsqueeze(0)


def decision(
    judge: nn.Module, points: torch.Tensor, y: torch.Tensor, indices: Sequence[int], seed: int, repeats: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation's rule on ``points`` (B, C, H, W), or on every candidate of a stack (K, B, C, H, W):
    (robust (B,) bool — one draw and all repeats right on every candidate, per-draw accuracy (B,) over
    those 1 + repeats seeded draws on the worst candidate)."""
    robust, accuracy = None, None
    for candidate in as_stack(points):
        single = draw_flags(judge, candidate, y, indices, seed, STREAM_ADV)[0]
        reps = draw_flags(judge, candidate, y, indices, seed, STREAM_ADV_REPEATS, repeats)
        right = torch.cat([single[None], reps]).double()
        r, a = right.all(dim=0), right.mean(dim=0)
        robust = r if robust is None else robust & r
        accuracy = a if accuracy is None else torch.minimum(accuracy, a)
    assert robust is not None and accuracy is not None
    return robust, accuracy


def judge_reproduction(
    judge: nn.Module,
    points: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    broken: torch.Tensor,
    *,
    seed: int,
    repeats: int,
    library_flags: torch.Tensor | None = None,
) -> Reproduction:
    """Re-judge every break (``broken`` (B,) bool) on its stored point (B, C, H, W) with the decision's draws.

    ``library_flags`` (B,) bool, randAA only: the library's verdict, which counts a break by itself.
    """
    rows = broken.cpu().bool().nonzero().flatten()
    out = Reproduction(breaks=int(rows.numel()))
    if not rows.numel():
        return out
    sub = [int(indices[int(r)]) for r in rows]
    dev = rows.to(points.device)
    robust, _ = decision(judge, points[dev], y[dev.to(y.device)], sub, seed, repeats)
    lib = library_flags.cpu().bool()[rows] if library_flags is not None else torch.ones_like(robust)
    out.not_reproduced = [i for i, r, ok in zip(sub, robust.tolist(), lib.tolist()) if r and ok]
    out.library_draw_only = [i for i, r, ok in zip(sub, robust.tolist(), lib.tolist()) if r and not ok]
    return out


def unbounded_attack(
    judge: nn.Module,
    attack: AttackFn,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    *,
    seed: int,
    repeats: int,
    eps: float = UNBOUNDED_EPS,
    tolerance: float = UNBOUNDED_TOLERANCE,
) -> Unbounded:
    """Run ``attack`` (set to ε = ``eps``) on clean-correct examples x (B, C, H, W); count its survivors."""
    if not len(indices):
        return Unbounded(eps=eps, tolerance=tolerance)
    robust, _ = decision(judge, attack(x, y, list(indices)), y, indices, seed, repeats)
    return Unbounded(attacked=len(indices), survived=int(robust.sum()), eps=eps, tolerance=tolerance)


def mean_dlr(
    judge: nn.Module, points: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *, seed: int, draws: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """EoT mean (B,) of the DLR loss of the judge's scores over ``draws`` seeded draws, and its variance (B,).

    For a stack of candidates (K, B, C, H, W) the attack's best candidate per example counts (highest mean).
    """
    best_mean, best_var = None, None
    for candidate in as_stack(points):
        mean, var = _mean_dlr(judge, candidate, y, indices, seed=seed, draws=draws)
        if best_mean is None or best_var is None:
            best_mean, best_var = mean, var
        else:
            better = mean > best_mean
            best_mean, best_var = torch.where(better, mean, best_mean), torch.where(better, var, best_var)
    assert best_mean is not None and best_var is not None
    return best_mean, best_var


def _mean_dlr(
    judge: nn.Module, points: torch.Tensor, y: torch.Tensor, indices: Sequence[int], *, seed: int, draws: int
) -> tuple[torch.Tensor, torch.Tensor]:
    sampler = ExampleSeededSampler(seed, STREAM_GRADIENTS).bind(indices)
    with torch.no_grad(), seeded_latents(judge, sampler):
        values = torch.stack([dlr_loss(judge(points).double(), y).cpu() for _ in range(draws)])
    values = torch.nan_to_num(values, nan=0.0, posinf=1.0, neginf=-1.0)
    var = values.var(dim=0, unbiased=True) / draws if draws > 1 else torch.zeros(values.shape[1], dtype=values.dtype)
    return values.mean(dim=0), var


def non_convergence(
    judge: nn.Module,
    doubled: AttackFn,
    x: torch.Tensor,
    points: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    survived: torch.Tensor,
    *,
    seed: int,
    repeats: int,
    draws: int = EOT_DRAWS,
) -> Convergence:
    """Attack the survivors again with the doubled budget (``doubled``) and compare with their ``points``.

    x, points (B, C, H, W): the clean examples and the attack's points; ``survived`` (B,) bool, B = the
    clean-correct examples of the subset.
    """
    rows = survived.cpu().bool().nonzero().flatten()
    out = Convergence(examples=len(indices), survivors=int(rows.numel()))
    if not rows.numel():
        return out
    sub = [int(indices[int(r)]) for r in rows]
    dev = rows.to(x.device)
    ps = as_stack(points)
    xs, ys, ps = x[dev], y[dev.to(y.device)], ps[:, dev.to(ps.device)].to(x.device)
    again = doubled(xs, ys, sub).to(x.device)
    robust, p = decision(judge, again, ys, sub, seed, repeats)
    q = p ** (repeats + 1)  # P(robust) if each draw were right independently with the measured rate
    out.broken = int((~robust).sum())
    out.decision_var = float((q * (1 - q)).sum())
    loss, var = mean_dlr(judge, ps, ys, sub, seed=seed, draws=draws)
    loss2, var2 = mean_dlr(judge, again, ys, sub, seed=seed, draws=draws)
    out.loss, out.loss_doubled, out.loss_var = float(loss.sum()), float(loss2.sum()), float((var + var2).sum())
    return out


def pairwise_cosine(g: torch.Tensor) -> torch.Tensor:
    """Mean cosine (B,) over the pairs of D draws of gradients g (D, B, P); NaN where a draw is zero/non-finite."""
    d = g.shape[0]
    norm = g.norm(dim=2, keepdim=True)
    usable = (torch.isfinite(g).all(dim=2) & (norm[..., 0] > 0)).all(dim=0)
    u = torch.nan_to_num(g / norm.clamp_min(1e-300))
    gram = torch.einsum("dbp,ebp->bde", u, u)
    mean = (gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)) / (d * (d - 1))
    return torch.where(usable, mean, torch.full_like(mean, float("nan")))


def implied_eot(rho: float, target: float = EOT_TARGET_COSINE) -> float:
    """K draws whose mean agrees with another such mean to cosine ``target``: Kρ/(1+(K−1)ρ) = target."""
    if rho >= 1.0:
        return 1.0
    if rho <= 0.0:
        return math.inf
    return max(1.0, target * (1.0 - rho) / (rho * (1.0 - target)))


def eot_noise(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    *,
    eot: int,
    seed: int,
    losses: Sequence[str] = ("ce",),
    draws: int = EOT_DRAWS,
) -> EotNoise:
    """ρ of ``draws`` single-draw input gradients per example and loss, pooled; ``eot``: the attack's EoT."""
    out = EotNoise(eot=eot)
    if not len(indices):
        return out
    sampler = ExampleSeededSampler(seed, STREAM_GRADIENTS).bind(indices)
    with seeded_latents(model, sampler):
        for loss in losses:
            g = torch.stack([input_gradient(model, x, y, loss).flatten(1).double().cpu() for _ in range(draws)])
            cos = pairwise_cosine(g)
            ok = ~torch.isnan(cos)
            out.gradients += int(ok.sum())
            out.undefined += int((~ok).sum())
            out.cosine += float(cos[ok].sum())
    return out


def transfer_beats_whitebox(flags: dict[str, list[int]]) -> dict[str, Transfer]:
    """Per transfer/black-box attack: the examples it broke (flag 0) that every white-box attack left (1).

    ``flags``: attack → per-example flags (1 survived, 0 broken by it, -1 not attacked), as ``adaptive``.
    """
    white = [torch.tensor(v) for name, v in flags.items() if name in WHITE_BOX]
    if not white:
        return {}
    left = torch.stack(white).eq(1).all(dim=0)
    return {
        name: Transfer(examples=len(v), broken=int((torch.tensor(v).eq(0) & left).sum()))
        for name, v in flags.items()
        if name in TRANSFERS
    }


# --------------------------------------------------------------------------------------------------
# Wiring: every indicator of every attack of one adaptive batch, and their summary over batches
# --------------------------------------------------------------------------------------------------


def unbounded_settings(s: EvalSettings, eps: float = UNBOUNDED_EPS) -> EvalSettings:
    """Large ε, reduced budget: ≤ 10 steps, ≤ 5 EoT, ≤ 500 queries; PGD steps of 2.5 ε / steps (Madry)."""
    steps = min(s.pgd_steps, 10)
    return dataclasses.replace(
        s,
        eps=eps,
        aa_steps=min(s.aa_steps, 10),
        aa_eot=min(s.aa_eot, 5),
        pgd_steps=steps,
        pgd_eot=min(s.pgd_eot, 5),
        pgd_step_size=2.5 * eps / steps,
        square_queries=min(s.square_queries, 500),
    )


def doubled_settings(s: EvalSettings) -> EvalSettings:
    """2× steps and 2× EoT (and 2× Square queries)."""
    return dataclasses.replace(
        s,
        aa_steps=2 * s.aa_steps,
        aa_eot=2 * s.aa_eot,
        pgd_steps=2 * s.pgd_steps,
        pgd_eot=2 * s.pgd_eot,
        square_queries=2 * s.square_queries,
    )


def attack_fn(name: str, model: nn.Module, classifier: nn.Module, s: EvalSettings, device: torch.device) -> AttackFn:
    """The adaptive evaluation's attack ``name`` with the settings ``s``, as (x, y, indices) → points."""

    def attack(x: torch.Tensor, y: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return run_candidates(name, model, classifier, x, y, indices, s, device).points

    return attack


def batch_indicators(
    model: nn.Module,
    judge: nn.Module,
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: Sequence[int],
    result: Any,
    clean: torch.Tensor,
    s: EvalSettings,
    device: torch.device,
) -> dict[str, Any]:
    """Every indicator but ``transfer`` for every attack of one batch's ``AdaptiveResult``; JSON (raw counts).

    ``model`` is attacked, ``judge`` decides (as in ``adaptive_attack``); the subset is the clean-correct
    examples among the evaluation's first ``s.indicator_examples``.
    """
    t0 = time.time()
    idx = [int(i) for i in indices]
    rows = torch.tensor([r for r, i in enumerate(idx) if i < s.indicator_examples and bool(clean[r])], dtype=torch.long)
    sub = [idx[int(r)] for r in rows]
    dev = rows.to(x.device)
    xs, ys = x[dev], y[dev.to(y.device)]
    out: dict[str, dict[str, Any]] = {}
    cost = dict.fromkeys(INDICATOR_TYPES, 0.0)  # seconds per indicator, over the attacks

    def timed(key: str, fn: Callable[..., _Indicator], *args: Any, **kwargs: Any) -> _Indicator:
        t = time.time()
        value = fn(*args, seed=s.seed, **kwargs)
        cost[key] += time.time() - t
        return value

    for a in result.attacks:
        ind = _attack_indicators(a, timed, model, judge, classifier, y, idx, xs, ys, sub, rows, dev, s, device)
        out[a.name] = {k: asdict(v) for k, v in ind.items()}
    return {
        "attacks": out,
        "wall_s": round(time.time() - t0, 3),
        "cost_s": {k: round(v, 3) for k, v in cost.items() if k != "transfer"},
    }


def _attack_indicators(
    a: Any,
    timed: Callable[..., _Indicator],
    model: nn.Module,
    judge: nn.Module,
    classifier: nn.Module,
    y: torch.Tensor,
    idx: list[int],
    xs: torch.Tensor,
    ys: torch.Tensor,
    sub: list[int],
    rows: torch.Tensor,
    dev: torch.Tensor,
    s: EvalSettings,
    device: torch.device,
) -> dict[str, _Indicator]:
    """The indicators of one attack ``a`` (an ``AttackOutcome``) of ``batch_indicators``, each ``timed``."""
    ind: dict[str, _Indicator] = {
        "reproduction": timed(
            "reproduction",
            judge_reproduction,
            judge,
            a.point,
            y,
            idx,
            a.flags == 0,
            repeats=s.repeats,
            library_flags=a.library_flags,
        ),
        "unbounded": timed(
            "unbounded",
            unbounded_attack,
            judge,
            attack_fn(a.name, model, classifier, unbounded_settings(s), device),
            xs,
            ys,
            sub,
            repeats=s.repeats,
        ),
        "convergence": timed(
            "convergence",
            non_convergence,
            judge,
            attack_fn(a.name, model, classifier, doubled_settings(s), device),
            xs,
            a.candidates[:, dev.to(a.candidates.device)],
            ys,
            sub,
            a.flags[rows] == 1,
            repeats=s.repeats,
        ),
    }
    if a.name in GRADIENT_SURFACES:
        aggregation, losses = GRADIENT_SURFACES[a.name]
        if a.name == "randaa":  # randAA attacks what the paper's protocol attacks (the authors' surface)
            aggregation = paper_surface(s.aggregation)
        eot = s.pgd_eot if a.name in PGD_EOT else s.aa_eot
        with surface(model, aggregation) if aggregation else contextlib.nullcontext():
            ind["eot_noise"] = timed("eot_noise", eot_noise, model, xs, ys, sub, eot=eot, losses=losses)
    return ind


def indicators_summary(
    parts: Sequence[dict[str, Any] | None], flags: dict[str, list[int]], adaptive_wall_s: float, examples: int
) -> dict[str, Any] | None:
    """results.json's ``indicators`` block from the batches' ``batch_indicators`` and the merged flags.

    ``flags``: attack → per-example flags (for ``transfer``); ``adaptive_wall_s``: the adaptive attacks'
    wall time, the reference of the indicators' relative cost.
    """
    parts = [p for p in parts if p]
    if not parts:
        return None
    merged: dict[str, dict[str, _Indicator]] = {}
    for part in parts:
        for name, ind in part["attacks"].items():
            row = merged.setdefault(name, {})
            for key, raw in ind.items():
                value = INDICATOR_TYPES[key](**raw)
                row[key] = row[key] + value if key in row else value
    for name, t in transfer_beats_whitebox(flags).items():
        merged.setdefault(name, {})["transfer"] = t
    wall = sum(p["wall_s"] for p in parts)
    cost: dict[str, float] = {}
    for p in parts:
        for key, seconds in (p.get("cost_s") or {}).items():
            cost[key] = round(cost.get(key, 0.0) + seconds, 3)
    attacks = {name: {key: row[key].to_json() for key in INDICATOR_TYPES if key in row} for name, row in merged.items()}
    failed = [
        f"{name}: {key}" for name, row in merged.items() for key in INDICATOR_TYPES if key in row and row[key].failed
    ]
    return {
        "attacks": attacks,
        "failed": failed,
        "examples": examples,
        "wall_s": round(wall, 3),
        "cost_s": cost,  # per indicator
        "adaptive_wall_s": round(adaptive_wall_s, 3),
        "relative_cost": wall / adaptive_wall_s if adaptive_wall_s > 0 else None,
        "meaning": "Pintor et al. 2022: a failed indicator means the attack may have failed silently on this "
        "model; its robust examples are then weak evidence (see README, 'Adaptive evaluation')",
    }
