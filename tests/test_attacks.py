"""FGSM, PGD and PGD+EoT: agreement with torchattacks, the ε-ball, loss increase, no parameter grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carso_cli.attacks import fgsm, input_gradient, pgd, pgd_eot

EPS = 8 / 255


def small_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )
    with torch.no_grad():
        model[-1].weight.mul_(20.0)  # confident logits, so that a small ε changes the loss visibly
    return model.to(dtype).eval()


class NoisyModel(nn.Module):
    """A stochastic classifier: fresh Gaussian noise on the input at every forward (like CARSO's z)."""

    def __init__(self, base: nn.Module, sigma: float = 0.1) -> None:
        super().__init__()
        self.base, self.sigma = base, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x + self.sigma * torch.randn_like(x))


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def loss_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="sum").item()


def assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor) -> None:
    eps_t = torch.as_tensor(eps).reshape(-1)
    linf = (x_adv - x).abs().flatten(1).amax(1)
    assert (linf <= eps_t + 1e-6).all()
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert not x_adv.requires_grad


def test_fgsm_and_pgd_equal_torchattacks(batch) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    x, y = batch
    model = small_cnn()
    assert torch.equal(fgsm(model, x, y, EPS), torchattacks.FGSM(model, eps=EPS)(x, y))
    ours = pgd(model, x, y, EPS, steps=7, step_size=2 / 255, random_start=False)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=7, random_start=False)(x, y)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, x)


def test_pgd_stays_in_ball_raises_loss_and_is_reproducible(batch) -> None:
    x, y = batch
    model = small_cnn()
    x_adv = pgd(model, x, y, EPS, steps=5, step_size=0.01, generator=torch.Generator().manual_seed(3))
    assert_in_ball(x_adv, x, EPS)
    assert loss_sum(model, x_adv, y) > loss_sum(model, x, y) * 1.05
    again = pgd(model, x, y, EPS, steps=5, step_size=0.01, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x_adv, again)
    # The random start covers the ε-ball: with 0 steps the result is the start itself.
    start = pgd(model, x, y, EPS, steps=0, step_size=0.01, generator=torch.Generator().manual_seed(4))
    assert_in_ball(start, x, EPS)
    assert (start - x).abs().max() > 0.9 * EPS


def test_fgsm_raises_loss_and_moves_by_eps(batch) -> None:
    x, y = batch
    x = 0.25 + 0.5 * x  # away from the box edges, so no clipping
    model = small_cnn()
    x_adv = fgsm(model, x, y, EPS)
    assert_in_ball(x_adv, x, EPS)
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, EPS), atol=1e-6)
    assert loss_sum(model, x_adv, y) > loss_sum(model, x, y)


def test_per_example_eps_matches_separate_calls(batch) -> None:
    """One call with eps (B,) = the groups of an adversarially-balanced batch attacked one by one."""
    x, y = batch
    model = small_cnn(dtype=torch.float64)
    x, h = x.double(), x.shape[0] // 2
    eps = torch.tensor([4 / 255] * h + [8 / 255] * h)
    for attack in (
        lambda x_, y_, e: fgsm(model, x_, y_, e),
        lambda x_, y_, e: pgd(model, x_, y_, e, steps=4, step_size=e / 3, random_start=False),
    ):
        joint = attack(x, y, eps)
        assert_in_ball(joint, x, eps)
        assert torch.allclose(joint[:h], attack(x[:h], y[:h], 4 / 255), atol=1e-12)
        assert torch.allclose(joint[h:], attack(x[h:], y[h:], 8 / 255), atol=1e-12)
    with pytest.raises(ValueError):
        fgsm(model, x, y, torch.ones(3))


def test_no_parameter_gradients_and_mode_unchanged(batch) -> None:
    x, y = batch
    model = small_cnn()
    fgsm(model, x, y, EPS)
    pgd(model, x, y, EPS, steps=2, step_size=0.01)
    model.train()  # the attacks leave the mode to the caller
    pgd_eot(NoisyModel(model), x, y, EPS, steps=2, step_size=0.01, eot_iterations=2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_pgd_eot_with_one_iteration_equals_pgd(batch) -> None:
    x, y = batch
    model = small_cnn()
    a = pgd_eot(model, x, y, EPS, steps=6, step_size=0.007, eot_iterations=1)
    b = pgd(model, x, y, EPS, steps=6, step_size=0.007, random_start=False)
    assert torch.equal(a, b)


def test_pgd_eot_on_a_stochastic_model(batch) -> None:
    x, y = batch
    model = NoisyModel(small_cnn(), sigma=0.05)
    steps_seen: list[int] = []
    torch.manual_seed(0)
    x_adv = pgd_eot(
        model,
        x,
        y,
        EPS,
        steps=8,
        step_size=0.007,
        eot_iterations=4,
        callback=lambda step, xa: steps_seen.append(step),
    )
    assert steps_seen == list(range(8))
    assert_in_ball(x_adv, x, EPS)

    def expected_loss(inputs: torch.Tensor) -> float:
        torch.manual_seed(1)
        return sum(loss_sum(model, inputs, y) for _ in range(16)) / 16

    assert expected_loss(x_adv) > expected_loss(x) * 1.05


def test_attacks_under_autocast_compute_in_float32(batch) -> None:
    x, y = batch
    model = small_cnn()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grad = input_gradient(model, x, y)
        x_adv = pgd(model, x, y, EPS, steps=3, step_size=0.01)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert x_adv.dtype == torch.float32
    assert_in_ball(x_adv, x, EPS)


def test_pgd_eot_through_carso(smoke_cfg) -> None:
    """The evaluation attack on the real defended model: finite, in the ball, no parameter grads."""
    from carso_cli.models import build_classifier, build_purifier
    from carso_cli.models.carso import CARSO

    torch.manual_seed(0)
    classifier = build_classifier(smoke_cfg).eval()
    purifier = build_purifier(smoke_cfg, classifier, inference_only=True).eval()
    carso = CARSO(classifier, purifier, samples=2).eval()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([1, 7])
    x_adv = pgd_eot(carso, x, y, EPS, steps=2, step_size=0.007, eot_iterations=2)
    assert_in_ball(x_adv, x, EPS)
    assert not torch.equal(x_adv, x)
    assert all(p.grad is None for p in carso.parameters())
