"""The robust aggregation (section 4.5) and its ablation alternatives (appendix B.2)."""

from __future__ import annotations

import pytest
import torch

from carso_cli.aggregation import (
    aggregate,
    dexp_aggregate,
    dexp_probabilities,
    log_odds_from_scores,
    probabilities,
)
from carso_cli.models import load_run


def test_equals_the_papers_formula() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 5, 10, dtype=torch.float64)
    # P_i = (1/Z) ∏_α exp(exp(l_i^α)), computed literally in float64
    prod = torch.exp(torch.exp(logits)).prod(dim=0)
    expected = prod / prod.sum(dim=-1, keepdim=True)
    assert torch.allclose(dexp_probabilities(logits), expected, rtol=1e-10)
    scores = dexp_aggregate(logits)
    assert torch.allclose(scores, torch.log(expected) - torch.log1p(-expected), rtol=1e-8, atol=1e-8)
    assert torch.allclose(probabilities(scores, "dexp"), expected, rtol=1e-8)


@pytest.mark.parametrize("method", ["dexp", "logit", "prob", "vote"])
def test_finite_at_extreme_logits_and_ties(method) -> None:
    cases = [
        torch.full((8, 2, 10), 60.0),  # all tied at a huge logit
        torch.zeros(8, 2, 10),  # all tied at zero
        torch.cat([torch.full((8, 2, 1), 60.0), torch.full((8, 2, 9), -60.0)], dim=-1),  # one dominant class
        torch.randn(8, 2, 10) * 30,
        torch.full((8, 2, 10), -80.0),
    ]
    for logits in cases:
        scores = aggregate(logits, method)
        assert scores.shape == (2, 10)
        assert torch.isfinite(scores).all(), (method, logits[0, 0, :3])
        p = probabilities(scores, method)
        assert torch.isfinite(p).all() and torch.allclose(p.sum(-1), torch.ones(2, dtype=p.dtype), atol=1e-5)
    if method != "vote":  # the vote breaks ties towards the lowest index (argmax)
        tied = aggregate(torch.full((8, 1, 10), 60.0), method)
        assert torch.allclose(tied, tied[:, :1].expand_as(tied))  # a tie stays a tie
        p = probabilities(tied, method)
        assert torch.allclose(p, torch.full_like(p, 0.1), atol=1e-6)


def test_dexp_gradients_are_finite_at_extremes() -> None:
    logits = torch.tensor([[[60.0, 60.0, -60.0]]]).repeat(8, 1, 1).requires_grad_()
    dexp_aggregate(logits)[0, 0].backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("method", ["dexp", "logit", "prob", "vote"])
def test_invariant_to_sample_order(method) -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 4, 10)
    perm = torch.randperm(8)
    assert torch.allclose(aggregate(logits, method), aggregate(logits[perm], method), atol=1e-6)


def test_log_odds_are_stable_and_monotone() -> None:
    scores = torch.tensor([[1e20, 1e20 - 1e14, 0.0], [3.0, 1.0, 2.0]])
    lo = log_odds_from_scores(scores)
    assert torch.isfinite(lo).all()
    assert lo[1].argsort().tolist() == scores[1].argsort().tolist()


def test_dexp_differs_from_logit_mean() -> None:
    # One reconstruction strongly favouring class 1 dominates the doubly-exponential product,
    # while the logit mean picks class 0: the paper's aggregation is not an average.
    logits = torch.tensor([[[2.0, 0.0]]] * 7 + [[[0.0, 5.0]]])
    assert aggregate(logits, "logit").argmax().item() == 0
    assert aggregate(logits, "dexp").argmax().item() == 1


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(torch.zeros(1, 1, 2), "median")


@pytest.mark.parametrize("method", ["dexp", "logit", "prob"])
def test_gradient_reaches_the_input_end_to_end(tiny_run, method) -> None:
    model = load_run(tiny_run).carso(samples=4, aggregation=method)
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    scores = model(x)
    torch.nn.functional.cross_entropy(scores, torch.tensor([0, 1, 2])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad != 0).float().mean() > 0.5  # dense, non-zero gradient through the purifier


def test_vote_is_the_non_differentiable_negative_control(tiny_run) -> None:
    model = load_run(tiny_run).carso(samples=4, aggregation="vote")
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2])).backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_carso_batches_reconstructions_and_is_deterministic_for_zero_samples(tiny_run) -> None:
    model = load_run(tiny_run).carso(samples=0)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), model(x)
        assert torch.equal(a, b)  # N = 0: one reconstruction from the prior's mean z = 0
        assert model.reconstruct(x).shape == (1, 2, 3, 32, 32)
    calls = []
    model.classifier.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    model.samples = 8
    with torch.no_grad():
        model(x)
    assert calls == [2, 16]  # the representation pass, then all 8×2 reconstructions in one call


def test_dexp_logsum_same_prediction_without_saturated_gradients() -> None:
    torch.manual_seed(2)
    logits = (torch.randn(8, 16, 10) * 3).requires_grad_()
    dexp, logsum = aggregate(logits, "dexp"), aggregate(logits, "dexp-logsum")
    assert torch.equal(dexp.argmax(-1), logsum.argmax(-1))  # the very same decision
    # dexp's scores are float64 (issue 23: unclamped log-odds), logsum's float32.
    assert torch.allclose(probabilities(logsum, "dexp-logsum").double(), probabilities(dexp, "dexp"), atol=1e-5)
    # A confidently classified example: logits around 4 saturate the paper's P, so the cross-entropy
    # gradient of its log-odds underflows to exactly 0 in float32; the log-sum surrogate keeps it.
    confident = torch.tensor([4.0, -1.0, 0.0]).repeat(8, 1, 1).requires_grad_()
    y = torch.tensor([0])
    (g_dexp,) = torch.autograd.grad(torch.nn.functional.cross_entropy(aggregate(confident, "dexp"), y), confident)
    (g_logsum,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(aggregate(confident, "dexp-logsum"), y), confident
    )
    assert torch.count_nonzero(g_dexp) == 0
    assert torch.count_nonzero(g_logsum) == g_logsum.numel()
