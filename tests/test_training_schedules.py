"""carso_cli.training.schedules: the LR and β schedules (Table 16) and the cosine LR."""

from __future__ import annotations

import pytest

from carso_cli import training as tr
from carso_cli.config import load_config


@pytest.fixture(scope="module")
def cifar10():
    return load_config("cifar10")


# --------------------------------------------------------------------------------------------------
# Schedules (Table 16, cifar10: warm-up 25, plateau 25, annealing 150; epochs count from 0)
# --------------------------------------------------------------------------------------------------


def test_lr_schedule_cifar10(cifar10) -> None:
    t = cifar10.training

    def lr(e):
        return tr.lr_at_epoch(t, e)

    assert lr(0) == pytest.approx(5e-9, rel=1e-12)  # initial LR during the first epoch
    assert lr(1) == pytest.approx(5e-9 + (0.064 - 5e-9) / 25)
    assert lr(12) == pytest.approx(5e-9 + (0.064 - 5e-9) * 12 / 25)
    assert lr(24) < 0.064 < lr(24) + 0.064 / 25 + 1e-12  # last warm-up epoch, one step short of the plateau
    for e in (25, 30, 49):
        assert lr(e) == pytest.approx(0.064)  # plateau: epochs 25 … 49
    assert lr(50) == pytest.approx(0.064 + (4.346e-4 - 0.064) / 150)  # annealing starts
    assert lr(124) == pytest.approx(0.064 + (4.346e-4 - 0.064) * 75 / 150)
    assert lr(199) == pytest.approx(4.346e-4)  # the last epoch runs at the final LR
    assert lr(250) == pytest.approx(4.346e-4)  # an extended run stays there
    values = [lr(e) for e in range(200)]
    assert all(a < b for a, b in zip(values[:25], values[1:26]))  # warm-up rises
    assert all(a > b for a, b in zip(values[49:199], values[50:200]))  # annealing falls


def test_beta_schedule_cifar10(cifar10) -> None:
    t = cifar10.training

    def beta(e):
        return tr.beta_at_epoch(t, e)

    assert [beta(e) for e in (0, 10, 24, 25)] == [0.0, 0.0, 0.0, 0.0]  # KL suppressed until epoch 25
    assert beta(26) == pytest.approx(1 / 9)
    assert beta(30) == pytest.approx(5 / 9)
    assert beta(33) == pytest.approx(8 / 9)
    assert beta(34) == 1.0 and beta(100) == 1.0 and beta(199) == 1.0


def test_cosine_lr() -> None:
    assert tr.cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert tr.cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert tr.cosine_lr(0.1, 100, 100) == pytest.approx(0.0)
