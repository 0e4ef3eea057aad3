"""Attack-failure indicators (Pintor et al. 2022): each one trips on a model built to trip it and stays quiet
on a healthy one; they print on a smoke evaluation, are stored in results.json, and fail ``carso sanity``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from carso_cli import evaluation as ev
from carso_cli.cli import app
from carso_cli.evaluation import adaptive
from carso_cli.evaluation import indicators as ind

runner = CliRunner()
SHAPE = (3, 8, 8)
CLASSES = 10


class Linear(nn.Module):
    """A smooth, deterministic classifier: logits = W x + b."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(math.prod(SHAPE), CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class ZeroGradient(nn.Module):
    """The same decisions as ``model``, with an input gradient that is exactly 0 (masked gradients)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.detach()) + 0.0 * x.flatten(1).sum(dim=1, keepdim=True)


class Quantised(nn.Module):
    """``model`` on the input rounded to multiples of 1/4: a perturbation below 1/8 never reaches it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 4) / 4)


class NoisyGradient(nn.Module):
    """``model``'s decisions, with a fresh random term σ R in the input gradient at every forward."""

    def __init__(self, model: nn.Module, sigma: float) -> None:
        super().__init__()
        self.inner = model
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.randn(CLASSES, math.prod(SHAPE))
        return self.inner(x) + self.sigma * (x - x.detach()).flatten(1) @ r.T  # adds 0 to the value


@pytest.fixture(scope="module")
def data() -> tuple[Linear, torch.Tensor, torch.Tensor, list[int]]:
    """12 images on the grid of ``Quantised`` (values 1/4, 1/2, 3/4), labelled by the linear model itself."""
    model = Linear().eval()
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(1, 4, (12, *SHAPE), generator=g) / 4).float()
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    return model, x, y, list(range(12))


def needed_eps(model: Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact smallest ℓ∞ perturbation (B,) that flips the linear model (no box constraint is active below 1/4)."""
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    logits = x.flatten(1) @ w.T + b
    margin = logits.gather(1, y[:, None]) - logits  # (B, C)
    norm = (w[y][:, None, :] - w[None, :, :]).abs().sum(dim=2)  # ‖w_y − w_j‖₁
    ratio = margin / norm.clamp_min(1e-12)
    ratio[torch.arange(len(y)), y] = float("inf")
    return ratio.min(dim=1).values


def corner(model: Linear, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """The exact worst case of the linear model in the ℓ∞ ball: x + ε sign(w_j − w_y) for the nearest class j."""
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    logits = x.flatten(1) @ w.T + b
    direction = w[None, :, :] - w[y][:, None, :]  # (B, C, P)
    reach = logits - logits.gather(1, y[:, None]) + eps * direction.abs().sum(dim=2)
    reach[torch.arange(len(y)), y] = -float("inf")
    j = reach.argmax(dim=1)
    step = direction[torch.arange(len(y)), j].sign().view_as(x)
    return (x + eps * step).clamp(0, 1)


# --------------------------------------------------------------------------------------------------
# judge reproduction
# --------------------------------------------------------------------------------------------------


def test_reproduction_trips_when_the_judge_is_not_the_attacked_model(data) -> None:
    model, x, y, idx = data
    points = corner(model, x, y, 0.1)  # 0.1 < 1/8: below the quantisation step
    with torch.no_grad():
        broken = model(points).argmax(dim=1) != y
    assert broken.sum() >= 3  # the attack did break the attacked model
    wrong_judge = ind.judge_reproduction(Quantised(model), points, y, idx, broken, seed=0, repeats=2)
    assert wrong_judge.failed and wrong_judge.not_reproduced == [i for i in idx if broken[i]]
    assert wrong_judge.breaks == int(broken.sum())
    right_judge = ind.judge_reproduction(model, points, y, idx, broken, seed=0, repeats=2)
    assert (
        right_judge.status == "pass" and right_judge.not_reproduced == [] and right_judge.breaks == wrong_judge.breaks
    )


def test_reproduction_lists_library_draw_breaks_apart(data) -> None:
    model, x, y, idx = data
    broken = torch.zeros(12, dtype=torch.bool)
    broken[[2, 5]] = True
    library = torch.ones(12, dtype=torch.bool)
    library[5] = False  # randAA: the library's own draw said broken; the seeded draws disagree
    r = ind.judge_reproduction(model, x, y, idx, broken, seed=0, repeats=1, library_flags=library)
    assert r.not_reproduced == [2] and r.library_draw_only == [5] and r.failed


# --------------------------------------------------------------------------------------------------
# unbounded attack
# --------------------------------------------------------------------------------------------------


def test_unbounded_attack_trips_on_a_zero_gradient_model(data) -> None:
    model, x, y, idx = data
    s = ind.unbounded_settings(ev.EvalSettings(pgd_steps=4, pgd_eot=1))
    assert s.eps == 0.5 and s.pgd_step_size == pytest.approx(2.5 * 0.5 / 4)
    masked = ZeroGradient(model)
    blind = ind.unbounded_attack(
        masked, ind.attack_fn("pgd-eot-logsum", masked, masked, s, torch.device("cpu")), x, y, idx, seed=0, repeats=1
    )
    assert blind.failed and blind.survived == blind.attacked == 12
    healthy = ind.unbounded_attack(
        model, ind.attack_fn("pgd-eot-logsum", model, model, s, torch.device("cpu")), x, y, idx, seed=0, repeats=1
    )
    assert healthy.status == "pass" and healthy.survived <= 1
    assert ind.Unbounded().status == "n/a"


# --------------------------------------------------------------------------------------------------
# non-convergence
# --------------------------------------------------------------------------------------------------


def early_stopping(model: Linear, eps: float, fraction: float):
    """A fake attack that stops early: it goes only ``fraction`` of the way to the worst case."""
    return lambda x, y, _idx: corner(model, x, y, fraction * eps)


def test_non_convergence_trips_on_an_attack_that_stops_early(data) -> None:
    model, x, y, idx = data
    eps = float(needed_eps(model, x, y).median())
    points = early_stopping(model, eps, 0.5)(x, y, idx)  # budget 1×: half of the way
    with torch.no_grad():
        survived = model(points).argmax(dim=1) == y
    result = ind.non_convergence(
        model, early_stopping(model, eps, 1.0), x, points, y, idx, survived, seed=0, repeats=2
    )  # budget 2×: all of the way
    assert result.failed and result.broken >= 1 and result.noise == 0.0  # deterministic: no draw noise
    assert result.drop == pytest.approx(result.broken / 12) and result.loss_rise > 0


def test_non_convergence_stays_quiet_on_a_converged_attack(data) -> None:
    model, x, y, idx = data
    eps = float(needed_eps(model, x, y).median())
    points = corner(model, x, y, eps)
    with torch.no_grad():
        survived = model(points).argmax(dim=1) == y
    assert 3 <= survived.sum() <= 9
    result = ind.non_convergence(model, early_stopping(model, eps, 1.0), x, points, y, idx, survived, seed=0, repeats=2)
    assert result.status == "pass" and result.broken == 0 and result.loss_rise == pytest.approx(0.0, abs=1e-9)


def test_convergence_noise_comes_from_the_repeats() -> None:
    # Two survivors broken by the doubled budget, each robust in half of its draws: within the draw noise.
    c = ind.Convergence(examples=4, survivors=2, broken=1, decision_var=2 * 0.25)
    assert c.noise == pytest.approx(2 * math.sqrt(0.5) / 4) and c.drop < c.noise and c.status == "pass"
    assert (c + c).examples == 8 and (c + c).noise == pytest.approx(2 * math.sqrt(1.0) / 8)


# --------------------------------------------------------------------------------------------------
# transfer beats white-box
# --------------------------------------------------------------------------------------------------


def test_transfer_beats_whitebox_on_a_zero_gradient_model(data) -> None:
    """The adaptive evaluation on a gradient-masked model: the white-box attacks are blind, the transfer from
    the smooth classifier with the same decisions breaks what they left."""
    model, x, y, idx = data
    eps = float(needed_eps(model, x, y).median())
    s = ev.EvalSettings(
        attack="adaptive",
        targets=["carso"],
        eps=eps,
        n_examples=12,
        batch_size=12,
        repeats=1,
        aa_steps=5,
        aa_eot=1,
        pgd_steps=5,
        pgd_step_size=eps / 2,
        pgd_eot=1,
    )
    clean = torch.ones(12, dtype=torch.bool)
    cpu = torch.device("cpu")

    def transfer(model_: nn.Module) -> dict[str, ind.Transfer]:
        result = adaptive.adaptive_attack(adaptive.AttackedBatch(model_, model_, model, x, y, idx, clean, s, cpu))
        return ind.transfer_beats_whitebox({a.name: a.flags.tolist() for a in result.attacks})

    masked = transfer(ZeroGradient(model))
    assert masked["transfer-classifier"].failed and masked["transfer-classifier"].broken >= 2
    healthy = transfer(model)
    assert all(t.status == "pass" for t in healthy.values()), healthy


def test_transfer_counts_only_what_every_white_box_attack_left() -> None:
    # #1 was broken by a white-box attack (pgd-eot-logsum), so a transfer break there does not count.
    flags = {
        "randaa": [1, 1, 0, -1],
        "randaa-logsum": [1, 1, -1, -1],
        "pgd-eot-logsum": [1, 0, -1, -1],
        "transfer-classifier": [0, 0, -1, -1],
        "square": [1, -1, -1, -1],
    }
    t = ind.transfer_beats_whitebox(flags)
    assert (t["transfer-classifier"].broken, t["transfer-classifier"].examples) == (1, 4)
    assert t["square"].broken == 0 and t["square"].status == "pass" and t["transfer-classifier"].failed


def test_transfer_counts_breaks_before_the_later_white_box_attacks() -> None:
    """Issue 20's white-box attacks run after the transfers: they never see an example a transfer broke
    (-1), which must not hide the break; an example no white-box attack ran on counts nothing."""
    flags = {
        "randaa": [1, 1, -1],
        "pgd-eot-logsum": [1, 0, -1],
        "transfer-classifier": [0, -1, -1],
        "representation": [-1, -1, 0],  # #2: broken where no white-box attack ran (a bookkeeping case)
        "apgd-t-eot": [-1, -1, -1],
    }
    t = ind.transfer_beats_whitebox(flags)
    assert t["transfer-classifier"].broken == 1 and t["transfer-classifier"].failed
    assert t["representation"].broken == 0


# --------------------------------------------------------------------------------------------------
# EoT noise
# --------------------------------------------------------------------------------------------------


def test_implied_eot_reaches_the_target_agreement() -> None:
    for rho in (0.05, 0.3, 0.5, 0.9):
        k = ind.implied_eot(rho, 0.8)
        assert k * rho / (1 + (k - 1) * rho) == pytest.approx(0.8) or k == 1.0
    assert ind.implied_eot(1.0) == 1.0 and math.isinf(ind.implied_eot(0.0))


def test_eot_noise_trips_on_noisy_gradients_and_predicts_the_eot_that_fixes_it(data) -> None:
    model, x, y, idx = data
    torch.manual_seed(0)
    noisy = NoisyGradient(model, sigma=0.1)
    result = ind.eot_noise(noisy, x, y, idx, eot=2, seed=0, losses=("ce", "dlr"))
    assert result.failed and result.gradients == 24 and result.rho < 0.5
    # The implied K really gives two independent K-draw means that agree to about the target cosine.
    k = math.ceil(result.implied_eot)
    agreement = float(ev.eot_agreement(noisy, x, y, idx, eot=k, seed=0).mean())
    assert agreement == pytest.approx(ind.EOT_TARGET_COSINE, abs=0.1)
    healthy = ind.eot_noise(model, x, y, idx, eot=2, seed=0, losses=("ce", "dlr"))
    assert healthy.status == "pass" and healthy.rho == pytest.approx(1.0) and healthy.implied_eot == 1.0


def test_eot_noise_counts_zero_gradients_as_undefined(data) -> None:
    model, x, y, idx = data
    result = ind.eot_noise(ZeroGradient(model), x, y, idx, eot=2, seed=0)
    assert result.status == "n/a" and result.undefined == 12 and result.gradients == 0


# --------------------------------------------------------------------------------------------------
# Summary, the smoke evaluation through the CLI, and carso sanity
# --------------------------------------------------------------------------------------------------


def test_summary_merges_batches_and_lists_the_failed() -> None:
    part = {
        "attacks": {
            "randaa": {
                "reproduction": {"breaks": 2, "not_reproduced": [], "library_draw_only": []},
                "unbounded": {"attacked": 2, "survived": 1, "eps": 0.5, "tolerance": 0.1},
            }
        },
        "wall_s": 1.0,
    }
    flags = {"randaa": [1, 0, 1, 1], "transfer-classifier": [-1, -1, 1, 0]}
    s = ind.indicators_summary([part, None, part], flags, adaptive_wall_s=4.0, examples=8)
    row = s["attacks"]["randaa"]
    assert row["reproduction"]["breaks"] == 4 and row["reproduction"]["status"] == "pass"
    assert (row["unbounded"]["attacked"], row["unbounded"]["survived"], row["unbounded"]["eps"]) == (4, 2, 0.5)
    assert s["failed"] == ["randaa: unbounded", "transfer-classifier: transfer"]
    assert s["relative_cost"] == pytest.approx(0.5) and s["wall_s"] == 2.0
    assert ind.indicators_summary([None], flags, 1.0, 8) is None


SMOKE = [
    "--target",
    "carso",
    "--n-examples",
    "6",
    "--batch-size",
    "6",
    "--samples",
    "2",
    "--steps",
    "2",
    "--eot",
    "1",
    "--repeats",
    "2",
    "--indicator-examples",
    "2",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def smoke_run(trained_smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained smoke run (its evaluations are written here, not beside the shared fixture)."""
    return Path(
        shutil.copytree(
            trained_smoke_run, tmp_path_factory.mktemp("indicators") / "run", ignore=shutil.ignore_patterns("eval")
        )
    )


def test_indicators_print_on_a_smoke_evaluation_and_sanity_fails_on_them(smoke_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--run", str(smoke_run), *SMOKE, "--name", "indicators"])
    assert result.exit_code == 0, result.output
    assert "attack-failure indicators" in result.output
    r = json.loads((smoke_run / "eval" / "indicators" / "results.json").read_text())
    block = r["indicators"]
    assert r["settings"]["indicator_examples"] == 2 and block["examples"] == 2
    assert list(block["attacks"]) == [a for a in adaptive.ATTACKS if a != "square"]
    for name, row in block["attacks"].items():
        assert {"reproduction", "unbounded", "convergence"} <= set(row), name
        assert row["reproduction"]["status"] == "pass", row  # every break is the evaluated model's own
        assert row["unbounded"]["attacked"] <= 2
    assert block["attacks"]["randaa"]["eot_noise"]["eot"] == 1
    assert "transfer" in block["attacks"]["transfer-classifier"]
    assert block["wall_s"] > 0 and block["relative_cost"] > 0
    for failed in block["failed"]:  # each failed indicator is named in yellow under the table
        assert failed.split(": ")[0] in result.output
    sanity = [
        "sanity",
        "--run",
        str(smoke_run),
        "--checks",
        "indicators",
        "--eval",
        "indicators",
        "--n-examples",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "s.json"),
    ]
    result = runner.invoke(app, sanity)
    assert result.exit_code == (1 if block["failed"] else 0), result.output
    (check,) = json.loads((tmp_path / "s.json").read_text())["checks"]
    assert check["status"] == ("fail" if block["failed"] else "pass") and check["details"]["failed"] == block["failed"]

    # The same results with one indicator tripped, and with none: sanity follows them.
    path = smoke_run / "eval" / "indicators" / "results.json"
    for failed, code in ((["square: unbounded"], 1), ([], 0)):
        path.write_text(json.dumps({**r, "indicators": {**block, "failed": failed}}))
        result = runner.invoke(app, sanity)
        assert result.exit_code == code, result.output
    # Without the evaluation, a warning (not a failure) that says how to make it.
    result = runner.invoke(app, [*sanity[:5], "--eval", "missing", *sanity[7:]])
    assert result.exit_code == 0 and "carso eval" in " ".join(result.output.split()), result.output


def test_no_indicators_skips_them(smoke_run: Path) -> None:
    result = runner.invoke(
        app, ["eval", "--run", str(smoke_run), *SMOKE, "--name", "plain", "--no-indicators", "--n-examples", "2"]
    )
    assert result.exit_code == 0, result.output
    r = json.loads((smoke_run / "eval" / "plain" / "results.json").read_text())
    assert r["indicators"] is None and r["settings"]["indicators"] is False
    assert "attack-failure indicators" not in result.output
    result = runner.invoke(app, ["eval", "--run", str(smoke_run), *SMOKE, "--indicator-examples", "0"])
    assert result.exit_code == 1 and "at least 1" in result.output
