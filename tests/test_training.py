"""The shared training pieces: schedules (Table 16), balanced batches (section 4.4), VAE loss, Lookahead,
training-state files."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carso_cli import attacks
from carso_cli import distributed
from carso_cli import training as tr
from carso_cli.config import load_config
from carso_cli.errors import CheckpointError
from carso_cli.models import build_classifier, set_eval_frozen


@pytest.fixture(scope="module")
def cifar10():
    return load_config("cifar10")


# --------------------------------------------------------------------------------------------------
# Schedules (Table 16, cifar10: warm-up 25, plateau 25, annealing 150; epochs count from 0)
# --------------------------------------------------------------------------------------------------


def test_lr_schedule_cifar10(cifar10) -> None:
    t = cifar10.training
    lr = lambda e: tr.lr_at_epoch(t, e)
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
    beta = lambda e: tr.beta_at_epoch(t, e)
    assert [beta(e) for e in (0, 10, 24, 25)] == [0.0, 0.0, 0.0, 0.0]  # KL suppressed until epoch 25
    assert beta(26) == pytest.approx(1 / 9)
    assert beta(30) == pytest.approx(5 / 9)
    assert beta(33) == pytest.approx(8 / 9)
    assert beta(34) == 1.0 and beta(100) == 1.0 and beta(199) == 1.0


def test_cosine_lr() -> None:
    assert tr.cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert tr.cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert tr.cosine_lr(0.1, 100, 100) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------------
# Adversarially-balanced batches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, fraction, counts",
    [
        (5120, 0.5, (640, 640, 640, 640)),  # cifar10 (Table 16)
        (2560, 0.15, (96, 96, 96, 96)),  # cifar100: 384 perturbed
        (1024, 0.01, (3, 3, 2, 2)),  # tinyimagenet: round(10.24) = 10, earlier groups take the remainder
        (10, 0.5, (2, 1, 1, 1)),
        (5, 0.5, (1, 1, 1, 0)),  # 2.5 rounds up to 3
        (7, 0.0, (0, 0, 0, 0)),
        (6, 1.0, (2, 2, 1, 1)),
    ],
)
def test_balanced_batch_plan_counts(batch: int, fraction: float, counts: tuple[int, ...]) -> None:
    plan = tr.balanced_batch_plan(batch, fraction)
    assert plan.groups.shape == (batch,)
    assert plan.counts == counts
    assert plan.perturbed == sum(counts) == math.floor(fraction * batch + 0.5)
    assert int((plan.groups == tr.CLEAN).sum()) == batch - sum(counts)
    assert max(counts) - min(counts) <= 1


def test_balanced_batch_plan_spreads_over_shards() -> None:
    """Each rank's contiguous shard of the global batch gets the same mix (equal attack work)."""
    plan = tr.balanced_batch_plan(5120, 0.5)
    for world in (2, 4, 8):
        size = 5120 // world
        for r in range(world):
            assert plan.slice(r * size, (r + 1) * size).counts == tuple(c // world for c in plan.counts)


@pytest.fixture(scope="module")
def frozen_classifier():
    cfg = load_config("smoke")
    torch.manual_seed(0)
    model = build_classifier(cfg)
    # A few train-mode passes give the BatchNorm statistics some non-trivial values.
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32))
    set_eval_frozen(model)
    return model


def test_make_balanced_batch_uses_the_four_attacks(frozen_classifier) -> None:
    cfg = load_config("smoke")
    a = cfg.attacks
    torch.manual_seed(1)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    plan = tr.balanced_batch_plan(16, 0.5)  # 8 perturbed: 2 per group
    gen = torch.Generator().manual_seed(5)
    x_in = tr.make_balanced_batch(frozen_classifier, x, y, plan, a, gen)
    g = plan.groups
    strengths = dict(enumerate(tr.attack_strengths(a)))
    assert strengths == {0: 4 / 255, 1: 4 / 255, 2: 8 / 255, 3: 8 / 255}
    clean = g == tr.CLEAN
    assert torch.equal(x_in[clean], x[clean])  # the clean part is untouched
    assert x_in.min() >= 0 and x_in.max() <= 1
    delta = (x_in - x).abs().flatten(1).amax(1)
    for k in range(4):
        rows = g == k
        assert (delta[rows] <= strengths[k] + 1e-6).all()
        assert (delta[rows] >= strengths[k] - 1e-6).all() if k in (0, 2) else (delta[rows] > strengths[k] / 2).all()
    # FGSM groups: the library's FGSM at ε/2 and ε (the test calls it per group, the code once for both).
    for k in (0, 2):
        rows = torch.nonzero(g == k).flatten()
        ref = attacks.fgsm(frozen_classifier, x[rows], y[rows], strengths[k])
        assert (ref != x_in[rows]).float().mean() < 1e-3  # equal up to rare sign ties
    # PGD groups: the library's PGD with the same random start (per-example ε in one call).
    rows = torch.nonzero((g == 1) | (g == 3)).flatten()
    eps = torch.tensor([strengths[int(k)] for k in g[rows]])
    ref = attacks.pgd(frozen_classifier, x[rows], y[rows], eps, a.pgd_steps, a.pgd_step_size,
                      random_start=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ref, x_in[rows])
    # The attacks raise the classifier's loss.
    with torch.no_grad():
        before = F.cross_entropy(frozen_classifier(x), y, reduction="none")
        after = F.cross_entropy(frozen_classifier(x_in), y, reduction="none")
    assert (after[~clean] > before[~clean]).all()


def test_make_balanced_batch_does_not_depend_on_rank_split(frozen_classifier) -> None:
    a = load_config("smoke").attacks
    torch.manual_seed(2)
    x, y = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))
    plan = tr.balanced_batch_plan(12, 0.5)
    whole = tr.make_balanced_batch(frozen_classifier, x, y, plan, a, torch.Generator().manual_seed(9))
    parts = []
    for lo, hi in ((0, 5), (5, 12)):  # uneven shards, as torch's shard of 12 over 2 is not
        parts.append(tr.make_balanced_batch(frozen_classifier, x[lo:hi], y[lo:hi], plan.slice(lo, hi), a,
                                            torch.Generator().manual_seed(9), global_plan=plan, offset=lo))
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Loss, Lookahead, state files
# --------------------------------------------------------------------------------------------------


def test_vae_loss_components() -> None:
    torch.manual_seed(0)
    x, x_hat = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8).clamp(0.01, 0.99)
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    loss = tr.vae_loss(x_hat, x, mu, logvar, beta=0.25)
    bce = -(x * x_hat.log() + (1 - x) * (1 - x_hat).log()).sum()
    var = logvar.exp()
    kl = 0.5 * (var + mu**2 - 1 - logvar).sum()  # KL(N(μ, σ²) ‖ N(0, I)) in closed form
    assert torch.allclose(loss.bce, bce, rtol=1e-5)
    assert torch.allclose(loss.kl, kl, rtol=1e-5)
    assert torch.allclose(loss.total, bce + 0.25 * kl, rtol=1e-5)
    assert tr.vae_loss(x, x, torch.zeros(4, 5), torch.zeros(4, 5), 1.0).kl.abs() < 1e-6


def test_lookahead_matches_the_definition() -> None:
    """k fast SGD steps, then slow ← slow + α(fast − slow) and fast ← slow."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = tr.Lookahead(torch.optim.SGD([w], lr=0.1), k=3, alpha=0.5)
    slow, fast = w.detach().clone(), w.detach().clone()
    for step in range(1, 8):
        opt.zero_grad()
        (w**2).sum().backward()  # gradient 2w
        opt.step()
        fast = fast - 0.1 * 2 * fast
        if step % 3 == 0:
            slow = slow + 0.5 * (fast - slow)
            fast = slow.clone()
        assert torch.allclose(w.detach(), fast)
    assert torch.allclose(opt.slow[0][0], slow)
    with opt.slow_weights():
        assert torch.allclose(w.detach(), slow)
    assert torch.allclose(w.detach(), fast)  # the fast weights come back


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = tr.Lookahead(torch.optim.RAdam(model.parameters(), lr=0.01), k=3, alpha=0.8)
    return model, opt


def _steps(model, opt, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_training_state_round_trip(tmp_path) -> None:
    """Saving and loading model, RAdam + Lookahead state and RNG states continues bit for bit."""
    model, opt = _model_and_optimizer(0)
    _steps(model, opt, 4, seed=1)  # mid-way through a Lookahead cycle
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    path = tmp_path / "state.safetensors"
    tr.save_training_state(path, kind="test", position=tr.Position(3, 2), model=model, optimizer=opt,
                           config_toml="name = 'x'\n", rng=[tr.capture_rng()], epoch_sums=[1.0, 2.0],
                           extra={"seed": 7})
    draws = (torch.rand(3), random.random(), np.random.rand())
    _steps(model, opt, 5, seed=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2 = _model_and_optimizer(99)
    state = tr.load_training_state(path, "test")
    model2.load_state_dict(state.model)
    tr.load_optimizer_state(opt2, state.optimizer)
    tr.restore_rng(*state.rng[0])
    assert state.position == tr.Position(3, 2) and state.epoch_sums == [1.0, 2.0] and state.extra == {"seed": 7}
    assert state.config_toml == "name = 'x'\n" and opt2.counter == 4
    assert torch.equal(draws[0], torch.rand(3)) and draws[1] == random.random() and draws[2] == np.random.rand()
    _steps(model2, opt2, 5, seed=2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k

    with pytest.raises(CheckpointError, match="is a test training checkpoint, not a purifier one"):
        tr.load_training_state(path, "purifier")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        tr.load_training_state(tmp_path / "junk.safetensors", "test")


def test_metrics_append_and_truncate(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    for e in range(4):
        tr.append_metrics(path, {"epoch": e, "loss": 1.0 / (e + 1)})
    tr.truncate_metrics(path, 2)
    assert [r["epoch"] for r in tr.read_metrics(path)] == [0, 1]


def test_epoch_batches_are_seeded_per_epoch() -> None:
    a = tr.epoch_batches(100, 32, seed=0, epoch=3)
    assert len(a) == 3 and all(len(b) == 32 for b in a)  # the last partial batch is dropped
    assert all(torch.equal(u, v) for u, v in zip(a, tr.epoch_batches(100, 32, seed=0, epoch=3)))
    assert not torch.equal(a[0], tr.epoch_batches(100, 32, seed=0, epoch=4)[0])
    assert len(set(torch.cat(a).tolist())) == 96  # no example twice


def test_relaunch_argv() -> None:
    argv = distributed.relaunch_argv("train-purifier", preset="smoke", out=None, resume=False, gpus=2, bf16=True,
                            set=["training.epochs=1", "data.num_workers=0"])
    assert argv == ["train-purifier", "--preset", "smoke", "--gpus", "2", "--bf16",
                    "--set", "training.epochs=1", "--set", "data.num_workers=0"]
