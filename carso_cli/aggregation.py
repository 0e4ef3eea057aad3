"""Aggregating the classifier's logits over N reconstructions into one prediction — pure functions.

The paper's robust aggregation (section 4.5; appendix B) is the normalised doubly-exponential product

    P_i = (1/Z) ∏_α exp(exp(l_i^α))  =  softmax_i(S),   S_i = Σ_α exp(l_i^α),

where l_i^α is the logit of class i on reconstruction α. The alternatives of the later version's
aggregation ablation (appendix B.2, Tables 4 and 5) are logit averaging, probability averaging and the
majority vote. Every function maps logits (N, B, C) to *scores* (B, C) whose argmax is the prediction
and which attacks can use as logits: differentiable (except the vote), and finite except on
``dexp-authors``, the authors' own float32 computation, kept as it is on purpose.
"""

from __future__ import annotations

import math

import torch


def doubly_exponential_scores(logits: torch.Tensor) -> torch.Tensor:
    """S_i = Σ_α exp(l_i^α). logits (N, B, C) → S (B, C); softmax(S) is the paper's P."""
    return torch.exp(logits).sum(dim=0)


def log_odds_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """log P_i − log(1 − P_i) for P = softmax(scores), computed stably.

    log P_i = S_i − logsumexp_j S_j and log(1 − P_i) = logsumexp_{j≠i} S_j − logsumexp_j S_j, so the
    log-odds are S_i − logsumexp_{j≠i} S_j: no division, no log of 0, finite with ties and with very
    large or very peaked scores.

    Args:
        scores: (B, C), C ≥ 2.
    Returns:
        (B, C) log-odds, monotone in P_i per row (same argmax as P).
    """
    c = scores.shape[-1]
    # The log-odds are shift-invariant; shifting by the row maximum first keeps S_i − S_j exact when
    # the scores are huge (e.g. 8·e^60), where the unshifted subtraction would round to 0.
    scores = scores - scores.max(dim=-1, keepdim=True).values.detach()
    eye = torch.eye(c, dtype=torch.bool, device=scores.device)
    # others[b, i, j] = S_j for j ≠ i, −inf on the diagonal.
    others = scores.unsqueeze(-2).expand(*scores.shape[:-1], c, c).masked_fill(eye, float("-inf"))
    return scores - torch.logsumexp(others, dim=-1)


def dexp_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """The paper's P (B, C) from logits (N, B, C)."""
    return torch.softmax(doubly_exponential_scores(logits), dim=-1)


def dexp_aggregate(logits: torch.Tensor) -> torch.Tensor:
    """Paper's robust aggregation as attack-ready scores: the log-odds of P. (N, B, C) → (B, C) float64.

    Computed and returned in float64, unclamped: S = Σ exp(l) is finite for logits up to ~700, and the
    log-odds (up to ~e^l) keep their gradient. A float32 result (or a clamp) would make every score of
    a confident example infinite (or constant) past logits of ~88 (~69 with the old ±1e30 clamp), and
    DLR's gradient, which is scale-free, exactly 0 there (issue 23).
    """
    return log_odds_from_scores(doubly_exponential_scores(logits.double()))


def dexp_authors_aggregate(logits: torch.Tensor) -> torch.Tensor:
    """The authors' surface: ebtorch's ``lexsemble`` as CARSOWrap returns it, in float32. (N, B, C) → (B, C).

    log(P / (1 − P)) with P = softmax_i(Σ_α exp l_i^α), literally (docs/FIDELITY.md cites the source
    lines). Same argmax as ``dexp`` while S is finite, but for a confident example P rounds to 1: the
    output is ±inf and CE / DLR gradients are NaN; past logits of ~88 S overflows and the row is NaN.
    It is what the authors' AutoAttack saw, so ``--attack autoattack`` attacks it (issue 23). Computed
    in the logits' dtype (float32 at least) so that a float64 recomputation shows what float32 loses.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    p = torch.softmax(torch.exp(logits).sum(dim=0), dim=-1)
    return torch.log(p / (1 - p))


def dexp_logsum_aggregate(logits: torch.Tensor) -> torch.Tensor:
    """The paper's aggregation exposed to attacks as log S_i = logsumexp_α l_i^α. (N, B, C) → (B, C).

    Same prediction as ``dexp_aggregate`` (log S is monotone in S, and P = softmax(S)), but on the
    scale of the logits: the paper's P is so peaked that for confidently classified examples its
    cross-entropy gradient underflows to exactly 0 in float32, blunting cross-entropy attacks
    (APGD-CE, PGD+EoT). Attacking this surrogate is an adaptive attack on the very same decision.
    """
    return torch.logsumexp(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=0)


def logit_mean_aggregate(logits: torch.Tensor) -> torch.Tensor:
    """Logit averaging (Table 4, "L.A."): mean over reconstructions. (N, B, C) → (B, C)."""
    return logits.mean(dim=0)


def prob_mean_aggregate(logits: torch.Tensor) -> torch.Tensor:
    """Probability averaging (Table 4, "P.A."): log of the mean softmax, stably. (N, B, C) → (B, C)."""
    n = logits.shape[0]
    return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=0) - math.log(n)


def vote_aggregate(logits: torch.Tensor) -> torch.Tensor:
    """Majority vote (Table 5): log of the vote fractions, smoothed so scores stay finite.

    Deliberately non-differentiable (argmax): its input gradient is zero almost everywhere. It is the
    negative control of the gradient-health check — its robust accuracy is gradient obfuscation.
    Ties go to the lowest class index (argmax).
    """
    n, _, c = logits.shape
    votes = torch.nn.functional.one_hot(logits.argmax(dim=-1), c).sum(dim=0).to(logits.dtype)  # (B, C)
    # The graph is cut by argmax; adding 0·logits keeps the output attached so attacks see exact zeros.
    return torch.log((votes + 1e-3) / (n + 1e-3 * c)) + 0.0 * logits.sum(dim=0)


AGGREGATIONS = {
    "dexp": dexp_aggregate,
    "dexp-authors": dexp_authors_aggregate,
    "dexp-logsum": dexp_logsum_aggregate,
    "logit": logit_mean_aggregate,
    "prob": prob_mean_aggregate,
    "vote": vote_aggregate,
}


def aggregate(logits: torch.Tensor, method: str = "dexp") -> torch.Tensor:
    """Dispatch by name ("dexp", "dexp-authors", "dexp-logsum", "logit", "prob", "vote"). (N, B, C) → (B, C)."""
    try:
        return AGGREGATIONS[method](logits)
    except KeyError:
        raise ValueError(f"unknown aggregation '{method}' (choose from {', '.join(AGGREGATIONS)})") from None


def probabilities(scores: torch.Tensor, method: str = "dexp") -> torch.Tensor:
    """Class probabilities from the scores of ``aggregate`` (for display: predict, reports)."""
    if method in ("dexp", "dexp-authors"):
        # log-odds → P: P_i = σ(log-odds_i) exactly; renormalise to absorb rounding.
        p = torch.sigmoid(scores)
        return p / p.sum(dim=-1, keepdim=True)
    if method == "dexp-logsum":
        # scores are log S: P = softmax(S) = softmax(exp(log S)), in float64 so S stays finite.
        return torch.softmax(torch.exp(scores.double()), dim=-1).to(scores.dtype)
    if method == "vote":
        return torch.exp(scores) / torch.exp(scores).sum(dim=-1, keepdim=True)
    return torch.softmax(scores, dim=-1)
