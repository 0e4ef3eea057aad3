"""Mutation tests of the adaptive evaluation (issue 23): each attack made a no-op, its loss's sign
flipped, or its candidates judged by the logit-averaged CARSO must make a named test fail.

The catchers run on toy CARSOs with known answers (``toys.py``; the representation attack on its trap,
``test_stochastic_attacks``), so the 33 mutations cost seconds.
``CARSO_MUTATION=attack:kind pytest …`` installs one mutation for a whole session, to list every test
of the suite that catches it (README, "Adaptive evaluation", "Mutation tests")."""

from __future__ import annotations

from collections.abc import Callable

import mutations
import pytest
import test_adaptive_judging as judging
import test_stochastic_attacks as stochastic
import torch
from toys import EPS, SHAPE, Fn, ToyCARSO, mean_pixel, toy_settings

from carso_cli.evaluation import adaptive

# Right (class 0) at x, wrong once the mean pixel moves by 3ε/4 — a move every white-box attack finds
# from the gradient of any surface (dexp, its float32 form, logsum, logit averaging) and Square from
# its margin; the classifier behind the transfer has the same boundary. No attack gets there by chance:
# a random start moves the mean pixel by ~ε/14 (64 pixels), Square's initial ±ε stripes (8 columns) by
# ≥ 3ε/4 with probability 9/256.
THRESHOLD = 0.5 + 3 * EPS / 4


def _breakable_logits(x: torch.Tensor) -> torch.Tensor:
    m = mean_pixel(x)
    low = torch.full_like(m, -5.0)  # two constant classes: APGD-T's targeted DLR needs four
    logits = torch.stack([torch.zeros_like(m), 100.0 * (m - THRESHOLD), low, low], dim=1)
    return torch.stack([logits, logits])  # two reconstructions (N, B, C)


def _breakable_classifier(x: torch.Tensor) -> torch.Tensor:
    return _breakable_logits(x)[0]


def check_attack_breaks_a_breakable_toy(name: str) -> None:
    """``name`` alone, as the adaptive evaluation runs it, breaks every example of the breakable toy,
    and the evaluated model (judging its candidates) reproduces it."""
    toy, classifier = ToyCARSO(_breakable_logits), Fn(_breakable_classifier)
    s = toy_settings()
    n = 4
    x, y = torch.full((n, *SHAPE), 0.5), torch.zeros(n, dtype=torch.long)
    assert (toy(x).argmax(-1) == 0).all()
    idx = list(range(n))
    c = adaptive.run_candidates(name, toy, classifier, x, y, idx, s, torch.device("cpu"))
    survived, first, _ = adaptive.judge_candidates(toy, c, y, idx, s)
    assert not survived.any(), f"{name} left {int(survived.sum())}/{n} examples of a breakable toy"
    assert (first >= 0).all()
    assert ((c.points - x[None]).abs().amax() <= EPS + 1e-6).all()


# The representation attack moves the representation away from the clean one in a random direction (or
# towards another class's example, which these toys' batches lack): on a toy it breaks half the examples,
# by design. Its catcher is its own trap (test_stochastic_attacks). Selective EoT ascends the untargeted
# margin, flat on the unbreakable toy (its runner-up class is constant): the breakable toy catches it.
OWN_TRAP = ("representation",)
FLAT_MARGIN = ("selective-eot",)
WHITE_BOX = [a for a in adaptive.ATTACKS if a != "square" and a not in OWN_TRAP]


@pytest.mark.parametrize("name", WHITE_BOX)
def test_each_attack_alone_breaks_a_breakable_toy(name: str) -> None:
    check_attack_breaks_a_breakable_toy(name)


def _unbreakable_logits(x: torch.Tensor) -> torch.Tensor:
    """The breakable toy with its boundary 2ε away: nothing breaks it, but every attack can get closer."""
    return _breakable_logits(x - 1.25 * EPS)


def check_attack_moves_toward_the_boundary(name: str) -> None:
    """On a toy no attack can break, ``name``'s candidates still lower the margin of every example: each
    attack keeps its best point (APGD's highest-loss, Square's lowest-margin, PGD's best iterate), not
    the input. Square's random search needs more pixels than the 8×8 toy gives it to break anything
    (the library's windows stall there), so this is its catcher."""
    toy, classifier = ToyCARSO(_unbreakable_logits), Fn(lambda x: _unbreakable_logits(x)[0])
    s = toy_settings(square=True, square_queries=200)
    n = 4
    x, y = torch.full((n, *SHAPE), 0.5), torch.zeros(n, dtype=torch.long)
    idx = list(range(n))
    c = adaptive.run_candidates(name, toy, classifier, x, y, idx, s, torch.device("cpu"))
    survived, _, _ = adaptive.judge_candidates(toy, c, y, idx, s)
    assert survived.all()
    moved = torch.stack([mean_pixel(p) - 0.5 for p in c.points]).amax(dim=0)  # best candidate per example
    assert (moved > EPS / 4).all(), f"{name} did not move toward the boundary: {(moved / EPS).tolist()} ε"


@pytest.mark.parametrize("name", [a for a in adaptive.ATTACKS if a not in OWN_TRAP + FLAT_MARGIN])
def test_each_attack_moves_toward_the_boundary_of_an_unbreakable_toy(name: str) -> None:
    check_attack_moves_toward_the_boundary(name)


def _attack_works(attack: str) -> None:
    if attack in OWN_TRAP:
        stochastic.check_trap_needs_the_new_attack(attack)
        return
    if attack not in FLAT_MARGIN:
        check_attack_moves_toward_the_boundary(attack)
    if attack in WHITE_BOX:
        check_attack_breaks_a_breakable_toy(attack)


def _disagreeing_toy(_attack: str) -> None:
    judging.test_toy_where_logit_averaging_disagrees_counts_no_break()


CATCHERS: dict[str, tuple[str, Callable[[str], None]]] = {
    "noop": ("test_each_attack_moves_toward_the_boundary_of_an_unbreakable_toy", _attack_works),
    "flip": ("test_each_attack_moves_toward_the_boundary_of_an_unbreakable_toy", _attack_works),
    "logit-judge": (
        "test_adaptive_judging::test_toy_where_logit_averaging_disagrees_counts_no_break",
        _disagreeing_toy,
    ),
}


@pytest.mark.parametrize("kind", mutations.KINDS)
@pytest.mark.parametrize("attack", mutations.ATTACKS)
def test_every_mutation_is_caught(attack: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _name, catcher = CATCHERS[kind]
    catcher(attack)  # passes on the real evaluation …
    mutations.apply(monkeypatch, attack, kind)
    with pytest.raises(AssertionError):  # … and fails on the mutated one
        catcher(attack)
