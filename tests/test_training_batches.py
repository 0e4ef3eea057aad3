"""carso_cli.training.batches: adversarially-balanced batches (section 4.4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from carso_cli import attacks
from carso_cli import training as tr
from carso_cli.config import load_config
from carso_cli.models import build_classifier, set_eval_frozen


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
    ref = attacks.pgd(
        frozen_classifier,
        x[rows],
        y[rows],
        eps,
        a.pgd_steps,
        a.pgd_step_size,
        random_start=True,
        generator=torch.Generator().manual_seed(5),
    )
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
        parts.append(
            tr.make_balanced_batch(
                frozen_classifier,
                x[lo:hi],
                y[lo:hi],
                plan.slice(lo, hi),
                a,
                torch.Generator().manual_seed(9),
                global_plan=plan,
                offset=lo,
            )
        )
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)
