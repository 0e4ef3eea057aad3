"""Mutations of the adaptive evaluation (issue 23): an attack that silently does nothing must be caught.

For each attack of ``--attack adaptive`` three faults an evaluation can have without crashing:

- ``noop``: the attack returns its input (for randAA the library's verdict is then the clean draw);
- ``flip``: the attack's loss has the wrong sign — for the gradient attacks the input gradient that
  reaches them is negated (a gradient-reversal hook on the attacked model's output: every step descends
  the loss it means to ascend; for the representation attack and selective EoT, which read CARSO's parts
  rather than its output, their ascent's gradient); for Square, whose steps use no gradient, its loss
  is negated;
- ``logit-judge``: the attack's candidates are judged by the logit-averaged CARSO, not the evaluated one
  (issue 23's fault 1).

``apply(monkeypatch, attack, kind)`` installs one, scoped to that attack only, by wrapping the module
attributes ``adaptive.run_candidates`` / ``adaptive.judge_candidates`` that ``adaptive_attack`` calls
(the indicators re-run the attacks through the same ``adaptive.run_candidates``).
``tests/test_mutations.py`` checks that each is caught by a named test; ``CARSO_MUTATION=attack:kind``
installs one for a whole pytest session (``tests/conftest.py``) to list every test that catches it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from carso_cli.evaluation import adaptive
from carso_cli.evaluation.saturation import paper_surface, surface
from carso_cli.evaluation.seeding import STREAM_ADV, draw_flags

ATTACKS = adaptive.ATTACKS
ASCENT = ("representation", "selective-eot")  # sign ascent on CARSO's parts, past the output hook
KINDS = ("noop", "flip", "logit-judge")


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return -g


@contextmanager
def _reversed_gradients(*models: nn.Module) -> Iterator[None]:
    hooks = [m.register_forward_hook(lambda _m, _i, out: _ReverseGradient.apply(out)) for m in models]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def _descending_ascent() -> Iterator[None]:
    """The attacks that call CARSO's parts rather than its output (the representation attack, selective
    EoT) escape the output hook: their sign ascent gets the objective's gradient negated instead."""
    from carso_cli.evaluation import ascent, representation_attack, selective_eot, targeted_eot

    original = ascent.sign_ascent

    def descending(objective: Any, *args: Any, **kwargs: Any) -> Any:
        def flipped(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            value, grad = objective(x)
            return value, -grad

        return original(flipped, *args, **kwargs)

    modules = (representation_attack, selective_eot, targeted_eot)
    for m in modules:
        m.sign_ascent = descending  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m in modules:
            m.sign_ascent = original  # type: ignore[attr-defined]


@contextmanager
def _negated_square_loss() -> Iterator[None]:
    from pyautoattack.square import SquareAttack

    original = SquareAttack.margin_and_loss

    def flipped(self: Any, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        margin, loss = original(self, x, y)
        return margin, -loss

    SquareAttack.margin_and_loss = flipped  # type: ignore[method-assign]
    try:
        yield
    finally:
        SquareAttack.margin_and_loss = original  # type: ignore[method-assign]


def _noop(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: list[int], s: Any) -> Any:
    """What a do-nothing attack returns: the input as its only candidate (randAA: with the clean draw of
    the paper's surface as the library's verdict)."""
    points = x.detach().clone()[None]
    if name != "randaa":
        return adaptive.Candidates(points, ["noop"])
    with surface(model, paper_surface(s.aggregation)):
        verdict = draw_flags(model, x, y, idx, s.seed, STREAM_ADV)[0].to(x.device)
    return adaptive.Candidates(points, ["noop"], verdict, [], x.detach().clone())


def apply(monkeypatch: Any, attack: str, kind: str) -> None:
    """Install mutation ``kind`` on ``attack`` for the rest of ``monkeypatch``'s scope."""
    if attack not in ATTACKS or kind not in KINDS:
        raise ValueError(f"unknown mutation {attack}:{kind}")
    run, judge = adaptive.run_candidates, adaptive.judge_candidates

    def mutated_run(name: str, model: nn.Module, classifier: nn.Module, x, y, idx, s, device):  # type: ignore[no-untyped-def]
        if name != attack:
            return run(name, model, classifier, x, y, idx, s, device)
        if kind == "noop":
            return _noop(name, model, x, y, idx, s)
        if kind == "flip":
            with _negated_square_loss() if name == "square" else _reversed_gradients(model, classifier):
                with _descending_ascent() if name in ASCENT else contextlib.nullcontext():
                    return run(name, model, classifier, x, y, idx, s, device)
        c = run(name, model, classifier, x, y, idx, s, device)
        c.judge_by_logit = True  # read by mutated_judge below
        return c

    def mutated_judge(judge_model: nn.Module, c: Any, y, idx, s):  # type: ignore[no-untyped-def]
        if getattr(c, "judge_by_logit", False):
            with surface(judge_model, "logit"):
                return judge(judge_model, c, y, idx, s)
        return judge(judge_model, c, y, idx, s)

    monkeypatch.setattr(adaptive, "run_candidates", mutated_run)
    monkeypatch.setattr(adaptive, "judge_candidates", mutated_judge)


def parse(text: str) -> tuple[str, str]:
    """``"pgd-eot-logsum:flip"`` → ``("pgd-eot-logsum", "flip")``."""
    attack, _, kind = text.partition(":")
    return attack, kind
