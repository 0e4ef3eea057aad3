"""The indicators themselves: one dataclass of counts each (summed over batches) and the function that
measures it. The overview is the package's docstring (``carso_cli.evaluation.indicators``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from carso_cli.evaluation.gradients import dlr_loss, input_gradient
from carso_cli.evaluation.saturation import LOGSUM_SURFACE
from carso_cli.evaluation.seeding import (
    STREAM_ADV,
    STREAM_ADV_REPEATS,
    STREAM_GRADIENTS,
    ExampleSeededSampler,
    draw_flags,
    seeded_latents,
)

__all__ = [
    "UNBOUNDED_EPS",
    "UNBOUNDED_TOLERANCE",
    "LOSS_TOLERANCE",
    "EOT_TARGET_COSINE",
    "EOT_DRAWS",
    "WHITE_BOX",
    "TRANSFERS",
    "GRADIENT_SURFACES",
    "PGD_EOT",
    "TITLES",
    "SETTING",
    "Reproduction",
    "Unbounded",
    "Convergence",
    "Transfer",
    "EotNoise",
    "INDICATOR_TYPES",
    "as_stack",
    "decision",
    "judge_reproduction",
    "unbounded_attack",
    "mean_dlr",
    "non_convergence",
    "pairwise_cosine",
    "implied_eot",
    "eot_noise",
    "transfer_beats_whitebox",
    "AttackFn",
]

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
    """Per transfer/black-box attack: the examples it broke (flag 0) that the white-box attacks left.

    ``flags``: attack → per-example flags (1 survived, 0 broken by it, -1 not attacked), as ``adaptive``.
    Left: survived every white-box attack that ran on it (those after the transfer in the adaptive order
    never see the examples it broke: -1), and at least one ran.
    """
    white = [torch.tensor(v) for name, v in flags.items() if name in WHITE_BOX]
    if not white:
        return {}
    stacked = torch.stack(white)
    left = stacked.ne(0).all(dim=0) & stacked.eq(1).any(dim=0)
    return {
        name: Transfer(examples=len(v), broken=int((torch.tensor(v).eq(0) & left).sum()))
        for name, v in flags.items()
        if name in TRANSFERS
    }
