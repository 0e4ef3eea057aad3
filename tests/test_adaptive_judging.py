"""Issue 23: every break judged by the evaluated model, every sub-attack's point kept, PGD+EoT's best
iterate, scores that carry gradient, a saturation measure that sees numerically useless gradients, and
the authors' float32 surface. Toy models with known answers; each test failed before its fix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from toys import EPS, SHAPE, Fn, ToyCARSO, mean_pixel, run_adaptive, toy_settings

from carso_cli import evaluation as ev
from carso_cli.aggregation import aggregate, dexp_aggregate
from carso_cli.attacks import pgd_eot
from carso_cli.evaluation.gradients import dlr_loss

# --------------------------------------------------------------------------------------------------
# Fault 1: the logit-averaged CARSO disagrees with the paper's; only the evaluated model may judge
# --------------------------------------------------------------------------------------------------


def _disagreeing_logits(x: torch.Tensor) -> torch.Tensor:
    """Two reconstructions: dexp says class 0 (S = e⁴+e⁻⁴ vs 1+e³), logit averaging says class 1 (0 vs 1.5),
    everywhere in the ε-ball (the x-term moves a logit by at most 0.1·ε)."""
    m = mean_pixel(x)[:, None] - 0.5
    r1 = torch.tensor([4.0, 0.0, -10.0]) + 0.1 * m * torch.tensor([1.0, -1.0, 0.0])
    r2 = torch.tensor([-4.0, 3.0, -10.0]) + 0.1 * m * torch.tensor([1.0, -1.0, 0.0])
    return torch.stack([r1.expand(x.shape[0], 3), r2.expand(x.shape[0], 3)])


def test_toy_where_logit_averaging_disagrees_counts_no_break() -> None:
    toy = ToyCARSO(_disagreeing_logits)
    x = torch.full((4, *SHAPE), 0.5)
    with ev.surface(toy, "logit"):
        assert (toy(x).argmax(-1) == 1).all()  # the transfer source is wrong on every example …
    assert (toy(x).argmax(-1) == 0).all()  # … the evaluated model right
    classifier = Fn(lambda x: torch.tensor([10.0, 0.0, 0.0]) + 0.1 * mean_pixel(x)[:, None])
    result = run_adaptive(toy, classifier, toy_settings(square=True))
    assert result.robust.all()
    for outcome in result.attacks:
        assert not (outcome.flags == 0).any(), f"{outcome.name} counted a break the evaluated model does not make"


# --------------------------------------------------------------------------------------------------
# Fault 2: a transfer whose source resists still tries its point; APGD keeps its highest-loss point
# --------------------------------------------------------------------------------------------------

THRESHOLD = 0.5 + EPS / 2


def _fragile_logits(x: torch.Tensor) -> torch.Tensor:
    """Right (class 0) while the mean pixel stays below 0.5 + ε/2, wrong beyond; no gradient (detached), so
    the white-box attacks on it cannot move and a random start stays ~7σ inside."""
    m = mean_pixel(x).detach()
    l1 = 100.0 * (m - THRESHOLD)
    logits = torch.stack([torch.zeros_like(m), l1, torch.full_like(m, -5.0)], dim=1) + 0.0 * x.flatten(1).sum(1, True)
    return torch.stack([logits, logits])


def _resisting_classifier(x: torch.Tensor) -> torch.Tensor:
    """Class 0 by a margin of ≥ 6.6 in the whole ball, but both CE and DLR increase with the mean pixel."""
    m = mean_pixel(x)
    return torch.stack([torch.full_like(m, 12.0), 10.0 * m, torch.zeros_like(m)], dim=1)


def test_transfer_point_is_tried_where_its_source_resists() -> None:
    toy = ToyCARSO(_fragile_logits)
    classifier = Fn(_resisting_classifier)
    result = run_adaptive(toy, classifier, toy_settings())
    flags = {o.name: o.flags for o in result.attacks}
    assert (flags["randaa"] == 1).all() and (flags["pgd-eot-logsum"] == 1).all()
    assert (flags["transfer-classifier"] == 0).all(), flags  # the source resists; its point breaks CARSO
    assert not result.robust.any()


def test_apgd_keeps_every_sub_attacks_highest_loss_point() -> None:
    classifier = Fn(_resisting_classifier)
    x = torch.full((3, *SHAPE), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    res = ev.autoattack_flags(
        classifier,
        x,
        y,
        eps=EPS,
        version="custom",
        attacks=["apgd-ce", "apgd-dlr"],
        seed=0,
        device=torch.device("cpu"),
        steps=5,
    )
    assert res.flags.all()  # the library's verdict: robust, and x_adv is x
    candidates = res.candidates.reshape(-1, *x.shape)
    assert candidates.shape[0] == 2  # one point per sub-attack, not one per example
    for k in range(2):
        moved = mean_pixel(candidates[k]) - 0.5
        assert (moved > EPS / 2).all(), (k, moved)  # APGD's highest-loss point, not the input


# --------------------------------------------------------------------------------------------------
# Fault 3: PGD+EoT keeps its best iterate; per-draw normalisation
# --------------------------------------------------------------------------------------------------


def test_pgd_eot_returns_the_best_iterate_not_the_last() -> None:
    # The loss is periodic along the mean pixel: sign steps of α overshoot its maximum and oscillate.
    model = Fn(lambda x: torch.stack([torch.zeros(x.shape[0]), 3.0 * torch.sin(200.0 * mean_pixel(x))], dim=1))
    x = torch.full((2, *SHAPE), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    seen: list[torch.Tensor] = []

    def loss(p: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(p), y, reduction="none")

    pgd_eot(model, x, y, EPS, 7, 0.006, 1, callback=lambda step, xa: seen.append(loss(xa)))
    best_seen = torch.stack([loss(x), *seen]).amax(dim=0)
    assert (best_seen > seen[-1] + 1e-3).all()  # the toy does oscillate: the last iterate is not the best
    x_adv = pgd_eot(model, x, y, EPS, 7, 0.006, 1, keep_best=True)
    assert torch.allclose(loss(x_adv), best_seen)


def test_eot_normalise_lets_every_draw_count_equally() -> None:
    # Draw 0 carries a gradient 10⁶× larger pointing down; the three others point up.
    calls = {"n": 0}

    def stochastic(x: torch.Tensor) -> torch.Tensor:
        k = calls["n"] % 4
        calls["n"] += 1
        scale = -1e6 if k == 0 else 1.0
        return torch.stack([torch.zeros(x.shape[0]), scale * (mean_pixel(x) - 0.5)], dim=1)

    x = torch.full((1, *SHAPE), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    raw = pgd_eot(Fn(stochastic), x, y, EPS, 1, EPS, 4)
    calls["n"] = 0
    normalised = pgd_eot(Fn(stochastic), x, y, EPS, 1, EPS, 4, normalise=True)
    assert mean_pixel(raw) < 0.5 < mean_pixel(normalised)


# --------------------------------------------------------------------------------------------------
# Fault 4: scores carry gradient; the saturation measure sees useless, not only zero, gradients
# --------------------------------------------------------------------------------------------------


def test_dexp_dlr_gradient_is_not_zero_at_large_logits() -> None:
    logits = torch.tensor([[[100.0, 99.0, 97.0]], [[99.5, 99.0, 96.0]]], requires_grad=True)  # (N=2, B=1, C=3)
    dlr_loss(dexp_aggregate(logits), torch.tensor([0])).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().max() > 1e-3, logits.grad


class SignFlip(nn.Module):
    """CE's float32 input gradient is non-zero but points the wrong way: p_y = 1 − e⁻²³ rounds to 1 in float32,
    so the label's term vanishes; float64 keeps it (−9·e⁻²³·w instead of +e⁻²³·w)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(64), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w.to(x.dtype) - 32.0
        return torch.stack([23.0 + 10.0 * s, s, s - 1.0], dim=1)


def test_saturation_counts_a_nonzero_but_wrong_gradient() -> None:
    x = torch.full((2, *SHAPE), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    g = ev.gradients.input_gradient(SignFlip(), x, y)
    assert (g != 0).all() and torch.isfinite(g).all()  # the old criterion saw nothing wrong
    flags = ev.saturated_flags(SignFlip(), x, y, range(2), seed=0)
    assert flags.bool().all()


# --------------------------------------------------------------------------------------------------
# Fault 5: the authors' float32 surface (ebtorch's lexsemble)
# --------------------------------------------------------------------------------------------------


def test_authors_surface_is_lexsemble_in_float32_and_goes_infinite() -> None:
    logits = torch.randn(4, 3, 10)  # (N, B, C) float32, as the authors' classifier returns
    p = torch.softmax(torch.exp(logits).sum(0), dim=-1)
    expected = torch.log(p / (1 - p))
    assert torch.equal(aggregate(logits, "dexp-authors"), expected)  # lexsemble, literally
    assert aggregate(logits.double(), "dexp-authors").dtype == torch.float64  # for the float64 recomputation
    confident = torch.tensor([[[9.0, 0.0, 0.0]]]).repeat(2, 1, 1)
    out = aggregate(confident, "dexp-authors")
    assert out[0, 0] == float("inf") and out.argmax(-1).item() == 0
    x = torch.full((2, *SHAPE), 0.5)
    toy = ToyCARSO(
        lambda x: (confident[:, :1] + 0.1 * mean_pixel(x)[None, :, None]).expand(2, x.shape[0], 3),
        aggregation="dexp-authors",
    )
    flags = ev.saturated_flags(toy, x, torch.zeros(2, dtype=torch.long), range(2), seed=0)
    assert (flags == ev.NONFINITE).all()  # NaN gradients, counted as such


def test_paper_protocol_attacks_the_authors_surface(monkeypatch) -> None:
    from carso_cli.evaluation import batch

    toy = ToyCARSO(_disagreeing_logits)
    seen: list[str] = []
    original = batch.autoattack_flags

    def spy(model: nn.Module, *args: object, **kwargs: object) -> object:
        carso = ev.find_carso(model)
        if carso is not None:
            seen.append(carso.aggregation)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(batch, "autoattack_flags", spy)
    s = toy_settings(attack="autoattack")
    x = torch.full((2, *SHAPE), 0.5)
    out = ev.evaluate_batch(
        Fn(_resisting_classifier), toy, x, torch.zeros(2, dtype=torch.long), range(2), s, torch.device("cpu")
    )
    assert seen == ["dexp-authors"] and toy.aggregation == "dexp"
    assert out["carso_randaa"] == [1, 1]


def test_pgd_eot_defaults_paper_for_pgd_eot_stronger_inside_adaptive(tiny_run) -> None:
    from typer.testing import CliRunner

    from carso_cli.cli import app
    from carso_cli.errors import CarsoError

    paper, adaptive_s = ev.EvalSettings(attack="pgd-eot"), ev.EvalSettings(attack="adaptive")
    assert (paper.restarts, paper.eot_normalise) == (1, False)
    assert (adaptive_s.restarts, adaptive_s.eot_normalise) == (2, True)
    assert ev.EvalSettings(attack="pgd-eot", restarts=3, eot_normalise=True).restarts == 3
    bad = ev.EvalSettings(restarts=0)
    try:
        bad.validate()
    except CarsoError as e:
        assert "restarts" in str(e)
    else:
        raise AssertionError("restarts 0 accepted")
    result = CliRunner().invoke(app, ["eval", "--run", str(tiny_run), "--restarts", "0", "--device", "cpu"])
    assert result.exit_code == 1 and "restarts must be at least 1" in result.output
