"""ℓ∞ white-box attacks as pure functions: FGSM, PGD (purifier training) and PGD+EoT (evaluation).

Every attack works in [0, 1] pixel space (normalisation lives inside the models), is untargeted,
maximises the cross-entropy summed over the batch and returns a detached tensor clipped to [0, 1].

``model`` is any callable ``x (B, C, H, W) → logits (B, classes)``. The gradient is taken with
``torch.autograd.grad`` with respect to the input only, so the model's parameters never accumulate
``.grad``, and no autograd graph survives from one step to the next. The attacks never change the
model's train/eval mode: the caller decides (purifier training puts the classifier in eval mode and
freezes it, section 4.4; evaluation puts the whole CARSO model in eval mode).

``eps`` and ``step_size`` may be a float or a per-example tensor of shape (B,): one call can then
attack the groups of an adversarially-balanced batch (section 4.4) at ε/2 and ε together.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Model = Callable[[Tensor], Tensor]
# callback(step, x_adv): called after each PGD step (e.g. for a progress bar); step counts from 0.
StepCallback = Callable[[int, Tensor], None]


def _per_example(value: float | Tensor, x: Tensor, what: str) -> float | Tensor:
    """A float, or a tensor broadcastable against ``x``: (B,) → (B, 1, 1, 1) on x's device/dtype."""
    if not isinstance(value, Tensor):
        return float(value)
    if value.numel() == 1:
        return float(value.item())
    if value.dim() != 1 or value.shape[0] != x.shape[0]:
        raise ValueError(f"{what} must be a float or a tensor of shape ({x.shape[0]},), got {tuple(value.shape)}")
    return value.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _wide(logits: Tensor) -> Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def input_gradient(model: Model, x: Tensor, y: Tensor) -> Tensor:
    """∇ₓ Σᵢ CE(model(xᵢ), yᵢ) for x (B, C, H, W), y (B,); the parameters get no gradient.

    The loss is computed in float32 even when the caller runs the model under autocast (float64
    scores, as the paper's aggregation returns, stay float64).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(_wide(model(x)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _project(x_adv: Tensor, x: Tensor, eps: float | Tensor) -> Tensor:
    """Onto the ℓ∞ ε-ball around x, then onto the image box [0, 1]."""
    # The same operations as torchattacks' PGD, so the two agree bit for bit.
    delta = torch.clamp(x_adv - x, min=-eps, max=eps)
    return torch.clamp(x + delta, 0.0, 1.0)


def _uniform_start(
    x: Tensor, eps: float | Tensor, generator: torch.Generator | None, noise: Tensor | None = None
) -> Tensor:
    """x + U(-ε, ε) noise, clipped to [0, 1].

    The uniform [0, 1) draws are ``noise`` when given (the caller drew them, e.g. for a whole global
    batch so that they do not depend on how it is split across ranks), else drawn from ``generator``
    (on its own device) or the global RNG.
    """
    if noise is None:
        device = generator.device if generator is not None else x.device
        noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
    return torch.clamp(x + (2.0 * noise.to(x.device, x.dtype) - 1.0) * eps, 0.0, 1.0)


def fgsm(model: Model, x: Tensor, y: Tensor, eps: float | Tensor) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow et al. 2015): x + ε·sign(∇ₓ CE), clipped to [0, 1].

    Args:
        model: x → logits.
        x: clean inputs (B, C, H, W) in [0, 1].
        y: true labels (B,).
        eps: ℓ∞ radius, a float or a per-example tensor (B,).

    Returns:
        Adversarial inputs (B, C, H, W), detached.
    """
    x = x.detach()
    eps_ = _per_example(eps, x, "eps")
    grad = input_gradient(model, x, y)
    return torch.clamp(x + eps_ * grad.sign(), 0.0, 1.0).detach()


def loss_and_gradient(model: Model, x: Tensor, y: Tensor, normalise: bool = False) -> tuple[Tensor, Tensor]:
    """Per-example CE (B,) and its input gradient (B, C, H, W) from one forward of ``model``.

    The loss is computed in float32 at least (float64 scores stay float64: the paper's log-odds are
    float64, and float32 would make them infinite). ``normalise``: the gradient of each example divided
    by its ℓ2 norm (computed in float64, so tiny gradients do not underflow; a zero gradient stays 0).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(_wide(model(x)), y, reduction="none")
        (grad,) = torch.autograd.grad(loss.sum(), x)
    if normalise:
        norm = grad.double().flatten(1).norm(dim=1).clamp_min(1e-300)
        grad = (grad.double() / norm.view(-1, *[1] * (grad.dim() - 1))).to(grad.dtype)
    return loss.detach(), grad


def eot_loss_and_gradient(
    model: Model,
    x: Tensor,
    y: Tensor,
    eot_iterations: int,
    normalise: bool = False,
) -> tuple[Tensor, Tensor]:
    """EoT averages over ``eot_iterations`` fresh forwards: loss (B,) and gradient (B, C, H, W).

    With ``normalise`` each draw's gradient is scaled to unit norm before averaging: on a peaked
    surface one draw can otherwise carry most of the sum and decide the sign step alone.
    """
    total_loss, total_grad = loss_and_gradient(model, x, y, normalise)
    for _ in range(eot_iterations - 1):
        loss, grad = loss_and_gradient(model, x, y, normalise)
        total_loss, total_grad = total_loss + loss, total_grad + grad
    return total_loss / eot_iterations, total_grad


def _better(loss: Tensor, best: Tensor, x_new: Tensor, x_best: Tensor) -> tuple[Tensor, Tensor]:
    """Per example the point with the higher loss (ties keep the earlier one)."""
    take = loss > best
    mask = take.view(-1, *[1] * (x_new.dim() - 1)).to(x_new.device)
    return torch.where(take, loss, best), torch.where(mask, x_new, x_best)


def pgd_eot(
    model: Model,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    steps: int,
    step_size: float | Tensor,
    eot_iterations: int,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    keep_best: bool = False,
    normalise: bool = False,
    start_noise: Tensor | None = None,
    return_loss: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """PGD with Expectation over Transformation, the evaluation attack of Lee & Kim (2024).

    The paper's settings (Table 14): 200 steps of 0.007 with 20 EoT iterations, from x, the last iterate
    returned. Each step averages the cross-entropy's gradient over ``eot_iterations`` fresh forwards of the
    (stochastic) model, takes a sign step and projects onto the ε-ball and [0, 1]. ``pgd``: one iteration.

    Args:
        model, x, y: x → logits (may be stochastic: CARSO draws new latents on each call); clean inputs
            (B, C, H, W) in [0, 1]; true labels (B,).
        eps, step_size: ℓ∞ radius and size of each sign step, floats or per-example tensors (B,).
        steps, eot_iterations: gradient steps; forward/backward passes averaged per step.
        random_start, generator: start from x + U(-ε, ε) drawn from ``generator``, not x (the paper's).
        callback: ``callback(step, x_adv)`` after each step (progress reporting).
        keep_best: return per example the iterate of highest EoT-averaged loss (the start and the last
            iterate included) instead of the last one (stronger; not the paper's).
        normalise: scale each draw's gradient to unit ℓ2 norm before averaging (not the paper's).
        start_noise: (B, C, H, W) uniform [0, 1) draws for the random start, drawn by the caller
            (start = x + (2·noise − 1)·ε); overrides ``generator``.
        return_loss: also return the EoT loss (B,) of the returned point (None without ``keep_best``).

    Returns:
        Adversarial inputs (B, C, H, W), detached (and their loss with ``return_loss``).
    """
    if steps < 0 or eot_iterations < 1:
        raise ValueError(f"need steps ≥ 0 and eot_iterations ≥ 1, got {steps} and {eot_iterations}")
    x = x.detach()
    eps_ = _per_example(eps, x, "eps")
    alpha = _per_example(step_size, x, "step_size")
    x_adv = _uniform_start(x, eps_, generator, start_noise) if random_start else x.clone()
    best_loss: Tensor | None = None
    x_best = x_adv
    for step in range(steps):
        # Expectation over Transformation: each iteration is a fresh forward of a stochastic model;
        # the sign of the summed gradient equals the sign of the EoT-averaged gradient.
        loss, grad = eot_loss_and_gradient(model, x_adv, y, eot_iterations, normalise)
        if keep_best:
            best_loss, x_best = (loss, x_adv) if best_loss is None else _better(loss, best_loss, x_adv, x_best)
        x_adv = _project(x_adv + alpha * grad.sign(), x, eps_).detach()
        if callback is not None:
            callback(step, x_adv)
    if keep_best:  # the last iterate, by one more EoT estimate, no step (the best is judged afterwards anyway)
        last = _eot_loss(model, x_adv, y, eot_iterations)
        best_loss, x_adv = (last, x_adv) if best_loss is None else _better(last, best_loss, x_adv, x_best)
    return (x_adv, best_loss) if return_loss else x_adv


# Projected Gradient Descent (Madry et al. 2018), ℓ∞: PGD+EoT with one draw per step, from a uniform random
# point of the ε-ball by default (``random_start=False``: from x). Returns the last iterate, detached.
pgd = functools.partial(pgd_eot, eot_iterations=1, random_start=True)


@torch.no_grad()
def _eot_loss(model: Model, x: Tensor, y: Tensor, eot_iterations: int) -> Tensor:
    """The cross-entropy (B,) averaged over ``eot_iterations`` forwards of a stochastic model."""
    return sum(F.cross_entropy(_wide(model(x)), y, reduction="none") for _ in range(eot_iterations)) / eot_iterations


def in_chunks(
    attack: Callable[..., Tensor],
    chunk: int | None,
    model: Model,
    x: Tensor,
    *args: object,
    parts: int | None = None,
    **kwargs: object,
) -> Tensor:
    """``attack(model, x, *args, **kwargs)`` on slices of at most ``chunk`` examples, concatenated.

    Bounds the memory of an attack (its autograd graph grows with the batch) without changing its
    result: the attacks here are per-example (the loss is a sum over examples and the model is in eval
    mode), so each example's adversarial input depends only on its own row. Every tensor argument whose
    first dimension is the batch (``y``, per-example ``eps``, ``start_noise``) is sliced alongside ``x``;
    floats and other values pass unchanged. ``chunk`` of None or ≥ the batch: one call. ``parts``: exactly
    that many near-equal slices instead (every rank the same count, when the model's BatchNorm is
    synchronised across ranks).

    A model in train mode (the classifier's adversarial training) normalises each slice with its own
    BatchNorm statistics: there, chunking changes the adversarial examples ("ghost" batch norm).
    """
    from carso_cli.memory import split

    n = x.shape[0]
    if parts is None and (chunk is None or chunk >= n):
        return attack(model, x, *args, **kwargs)
    if parts is None and chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be ≥ 1, got {chunk}")

    def part(value: object, lo: int, hi: int) -> object:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value[lo:hi]
        return value

    pieces = []
    for rows in split(n, chunk, parts):
        lo, hi = rows.start, rows.stop
        pieces.append(
            attack(model, x[lo:hi], *(part(a, lo, hi) for a in args), **{k: part(v, lo, hi) for k, v in kwargs.items()})
        )
    return torch.cat(pieces)
