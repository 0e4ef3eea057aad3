"""The shared training pieces: schedules, adversarially-balanced batches, VAE loss, Lookahead,
training-state files, and the epoch loop both ``train-purifier`` and ``train-classifier`` use.

Conventions (all documented here once):

- **Epochs count from 0.** ``lr_at_epoch(t, e)`` and ``beta_at_epoch(t, e)`` are the values used for the
  whole of epoch ``e`` (the LR scheduler is stepped after each epoch, Table 16). With the cifar10 preset
  (warm-up 25, plateau 25, annealing 150): epoch 0 runs at the initial LR 5e-9, epochs 25–49 at the
  plateau LR 0.064, and epoch 199, the last, at the final LR 4.346e-4; β is 0 up to epoch 25, rises
  linearly, and is 1 from epoch 34 on (β-increase epochs 25 and 34, Table 16).
- **Every random draw of a training step is a function of (seed, epoch, batch)**: the data order of an
  epoch, the PGD random starts and the VAE's reparameterisation noise are drawn for the *global* batch
  from generators seeded so, then sliced for the local rank. Hence N processes compute what one
  process with the global batch computes, and a run resumed mid-epoch continues exactly as an
  uninterrupted one. Data augmentation (when a preset turns it on) draws from each process's own RNG:
  it is seeded, saved and restored, but differs between 1 and N processes, and, with loader workers,
  after a mid-epoch resume (workers are seeded per epoch).
- Checkpoints are safetensors: tensors (model, flattened optimiser state, Lookahead slow weights, RNG
  states as uint8) plus a JSON header (position, config, format version), written atomically.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli.config import AttackConfig, TrainingConfig
from carso_cli.distributed import DistContext, gather_objects, shard
from carso_cli.errors import CheckpointError, ConfigError, TrainingError

STATE_FORMAT = "carso-training-state"
STATE_FORMAT_VERSION = 1


class TrainingInterrupted(TrainingError):
    """Ctrl-C / SIGTERM: training stopped after a consistent checkpoint."""


# --------------------------------------------------------------------------------------------------
# Schedules (Table 16; epochs count from 0, values hold for the whole epoch)
# --------------------------------------------------------------------------------------------------


def lr_at_epoch(t: TrainingConfig, epoch: int) -> float:
    """Learning rate for epoch ``epoch`` (linear warm-up, plateau, linear annealing; Smith 2017).

    Warm-up: epochs ``0 … W-1`` go linearly from ``initial_lr`` (epoch 0) towards ``plateau_lr``, which
    epoch ``W`` reaches. Plateau: epochs ``W … W+P-1``. Annealing: linear from the plateau (epoch
    ``W+P-1``) to ``final_lr`` at epoch ``W+P+A-1``; later epochs (a run extended with ``--epochs``)
    stay at ``final_lr``.
    """
    w, p, a = t.warmup_epochs, t.plateau_epochs, t.annealing_epochs
    if epoch < w:
        return t.initial_lr + (t.plateau_lr - t.initial_lr) * epoch / w
    if epoch < w + p or a == 0:
        return t.plateau_lr if epoch < w + p else t.final_lr
    progress = min(1.0, (epoch - (w + p - 1)) / a)
    return t.plateau_lr + (t.final_lr - t.plateau_lr) * progress


def beta_at_epoch(t: TrainingConfig, epoch: int) -> float:
    """KL weight β for epoch ``epoch``: 0 up to ``beta_start_epoch``, linear to 1 at ``beta_end_epoch``.

    Section 5.1 (β-increase, Higgins et al. 2017): β(start) = 0, β(end) = 1, 1 afterwards.
    """
    s, e = t.beta_start_epoch, t.beta_end_epoch
    if epoch >= e:
        return 1.0
    if epoch <= s:
        return 0.0
    return (epoch - s) / (e - s)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine annealing from ``base_lr`` to 0 over ``total_steps`` (classifier training, per batch)."""
    if total_steps <= 0:
        return base_lr
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


# --------------------------------------------------------------------------------------------------
# Adversarially-balanced batches (section 4.4)
# --------------------------------------------------------------------------------------------------

# The four attack groups, in the order the even split fills them (section 4.4).
ATTACK_GROUPS = ("FGSM ε/2", "PGD ε/2", "FGSM ε", "PGD ε")
CLEAN = -1


@dataclass(frozen=True)
class BalancedPlan:
    """Which examples of a batch are perturbed, and how.

    ``groups[i]`` is ``CLEAN`` (-1) or the index of example ``i``'s attack group in ``ATTACK_GROUPS``.
    """

    groups: torch.Tensor  # (B,) int64

    @property
    def counts(self) -> tuple[int, ...]:
        """Examples per attack group (in ``ATTACK_GROUPS`` order)."""
        return tuple(int((self.groups == g).sum()) for g in range(len(ATTACK_GROUPS)))

    @property
    def perturbed(self) -> int:
        return int((self.groups != CLEAN).sum())

    def slice(self, lo: int, hi: int) -> BalancedPlan:
        """The plan of examples ``lo … hi-1`` (a rank's shard of the global batch)."""
        return BalancedPlan(self.groups[lo:hi])


def balanced_batch_plan(batch_size: int, fraction: float) -> BalancedPlan:
    """The composition of an adversarially-balanced batch of ``batch_size`` examples.

    ``round(fraction · B)`` examples are perturbed (half-way rounds up), split as evenly as possible
    among FGSM ε/2, PGD ε/2, FGSM ε, PGD ε, earlier groups taking the remainder. The batch is
    shuffled, so which positions are perturbed does not matter for the data; they are spread evenly
    over the batch (Bresenham) and cycle through the groups, so that every rank's contiguous shard of a
    global batch gets the same mix (equal attack work per GPU).
    """
    if batch_size < 0 or not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"bad balanced batch: batch_size {batch_size}, fraction {fraction}")
    n = math.floor(fraction * batch_size + 0.5)
    groups = torch.full((batch_size,), CLEAN, dtype=torch.long)
    k = 0
    for i in range(batch_size):
        # Example i is perturbed when the running quota floor((i+1)·n/B) goes up at i.
        if (i + 1) * n // batch_size > i * n // batch_size:
            groups[i] = k % len(ATTACK_GROUPS)
            k += 1
    return BalancedPlan(groups)


def attack_strengths(attacks: AttackConfig) -> tuple[float, float, float, float]:
    """ε of the four groups (ATTACK_GROUPS order) from the preset's ``fgsm_eps`` and ``pgd_eps``."""
    for key in ("fgsm_eps", "pgd_eps"):
        if len(getattr(attacks, key)) != 2:
            raise ConfigError(f"attacks.{key} needs 2 values (ε/2 and ε, section 4.4)")
    return (attacks.fgsm_eps[0], attacks.pgd_eps[0], attacks.fgsm_eps[1], attacks.pgd_eps[1])


def make_balanced_batch(
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: BalancedPlan,
    attacks: AttackConfig,
    generator: torch.Generator | None = None,
    global_plan: BalancedPlan | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """The purifier's input for a batch: clean examples as they are, the others attacked.

    One FGSM call (groups FGSM ε/2 and FGSM ε, with per-example ε) and one PGD call (PGD ε/2, PGD ε)
    against the classifier. The target of the purifier stays the clean ``x``.

    Args:
        classifier: the frozen classifier (eval mode).
        x: (B, C, H, W) clean images in [0, 1]; y: (B,) labels.
        plan: this batch's composition (``balanced_batch_plan(...)``, sliced to this rank).
        generator: source of the PGD random starts.
        global_plan, offset: when ``x`` is rows ``offset : offset+B`` of a global batch with plan
            ``global_plan``, the random starts are drawn for all PGD examples of the global batch (in
            batch order) and this rank takes its own: the result does not depend on the rank split.
            Without them, the draws are exactly those of ``attacks.pgd(..., generator=generator)``.
    Returns:
        (B, C, H, W) purifier input in [0, 1].
    """
    from carso_cli import attacks as atk

    if plan.groups.shape[0] != x.shape[0]:
        raise ValueError(f"plan for {plan.groups.shape[0]} examples, batch of {x.shape[0]}")
    strengths = torch.tensor(attack_strengths(attacks), dtype=x.dtype, device=x.device)
    groups = plan.groups.to(x.device)
    x_in = x.clone()
    is_pgd = (groups == 1) | (groups == 3)
    fgsm_idx = torch.nonzero((groups == 0) | (groups == 2)).flatten()
    pgd_idx = torch.nonzero(is_pgd).flatten()
    if fgsm_idx.numel():
        x_in[fgsm_idx] = atk.fgsm(classifier, x[fgsm_idx], y[fgsm_idx], strengths[groups[fgsm_idx]])
    if global_plan is None:
        global_plan, offset = plan, 0
    global_pgd = (global_plan.groups == 1) | (global_plan.groups == 3)
    if pgd_idx.numel():
        noise = None
        if attacks.pgd_random_start:
            device = generator.device if generator is not None else x.device
            total = int(global_pgd.sum())
            before = int(global_pgd[:offset].sum())
            # One draw for the PGD examples of the global batch, as attacks.pgd draws it; ours are rows
            # before … before+n of it (the PGD examples of earlier ranks come first).
            noise = torch.rand((total, *x.shape[1:]), generator=generator, device=device, dtype=x.dtype)
            noise = noise[before:before + pgd_idx.numel()]
        x_in[pgd_idx] = atk.pgd(classifier, x[pgd_idx], y[pgd_idx], strengths[groups[pgd_idx]], attacks.pgd_steps,
                                attacks.pgd_step_size, random_start=noise is not None, start_noise=noise)
    elif attacks.pgd_random_start and bool(global_pgd.any()):
        # Keep the generator in step with the other ranks (they drew the global PGD noise).
        device = generator.device if generator is not None else x.device
        torch.rand((int(global_pgd.sum()), *x.shape[1:]), generator=generator, device=device, dtype=x.dtype)
    return x_in


# --------------------------------------------------------------------------------------------------
# The VAE loss
# --------------------------------------------------------------------------------------------------


class VAELoss(NamedTuple):
    """Sums over the batch (divide by the number of examples for per-example means)."""

    total: torch.Tensor  # scalar: bce + β·kl
    bce: torch.Tensor  # scalar: Σ_i Σ_pixels BCE(x̂_i, x_i)
    kl: torch.Tensor  # scalar: Σ_i KL(q(z|x_i, c_i) ‖ N(0, I))


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, beta: float) -> VAELoss:
    """Summed pixel-wise, channel-wise binary cross-entropy plus β·KL (section 5.1).

    Args:
        x_hat: (B, C, H, W) reconstruction in [0, 1]; x: (B, C, H, W) clean target in [0, 1].
        mu, logvar: (B, fjoint) parameters of the approximate posterior.
        beta: KL weight (``beta_at_epoch``).
    Returns:
        VAELoss of scalars summed over the batch. Computed in float32 (BCE is not autocast-safe).
    """
    x_hat, x, mu, logvar = x_hat.float(), x.float(), mu.float(), logvar.float()
    bce = F.binary_cross_entropy(x_hat, x, reduction="sum")
    kl = -0.5 * torch.sum(1.0 + logvar - mu.pow(2) - logvar.exp())
    return VAELoss(bce + beta * kl, bce, kl)


# --------------------------------------------------------------------------------------------------
# Lookahead
# --------------------------------------------------------------------------------------------------


class Lookahead:
    """Lookahead (Zhang et al. 2019): k fast steps of the inner optimiser, then slow += α(fast − slow).

    Hand-written because torch has none and the registry options (e.g. torch-optimizer) are
    unmaintained; it is a dozen lines. After every k-th step the fast weights are reset to the slow
    ones, so at those points the model holds the slow weights; ``slow_weights()`` swaps them in at any
    other point (what is evaluated and saved). ``state_dict`` holds the inner optimiser's state, the
    slow weights and the step counter.

    Args:
        optimizer: the inner optimiser (RAdam in the paper, Table 16).
        k: fast steps per slow update (Table 16: 6).
        alpha: slow-weights step size (Table 16, "averaging decay": 0.8).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 6, alpha: float = 0.8) -> None:
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ConfigError(f"Lookahead needs k ≥ 1 and 0 < α ≤ 1 (got k={k}, α={alpha})")
        self.optimizer = optimizer
        self.k = k
        self.alpha = alpha
        self.counter = 0
        self.slow = [[p.detach().clone() for p in group["params"]] for group in optimizer.param_groups]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self.counter += 1
        if self.counter % self.k == 0:
            for group, slows in zip(self.optimizer.param_groups, self.slow):
                for p, slow in zip(group["params"], slows):
                    slow.add_(p.detach() - slow, alpha=self.alpha)
                    p.copy_(slow)

    @contextmanager
    def slow_weights(self) -> Iterator[None]:
        """Temporarily put the slow weights into the model (to evaluate or save them)."""
        fast = [[p.detach().clone() for p in g["params"]] for g in self.optimizer.param_groups]
        with torch.no_grad():
            for group, slows in zip(self.optimizer.param_groups, self.slow):
                for p, slow in zip(group["params"], slows):
                    p.copy_(slow)
        try:
            yield
        finally:
            with torch.no_grad():
                for group, saved in zip(self.optimizer.param_groups, fast):
                    for p, f in zip(group["params"], saved):
                        p.copy_(f)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "slow": [[s.clone() for s in slows] for slows in self.slow],
            "counter": self.counter,
            "k": self.k,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        shapes = [[tuple(s.shape) for s in slows] for slows in self.slow]
        if [[tuple(s.shape) for s in slows] for slows in state["slow"]] != shapes:
            raise CheckpointError("the checkpoint's Lookahead slow weights do not match the model")
        with torch.no_grad():
            for mine, theirs in zip(self.slow, state["slow"]):
                for m, t in zip(mine, theirs):
                    m.copy_(t)
        self.counter = int(state["counter"])


# --------------------------------------------------------------------------------------------------
# Batch normalisation across ranks
# --------------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the backward sums the gradients over ranks too.

    (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated in recent torch.)
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Synchronised batch normalisation for CPU (gloo); ``nn.SyncBatchNorm`` only runs on GPUs.

    In training mode the batch mean and variance are those of the global batch: per-channel sums are
    all-reduced (two passes: mean, then the centred sum of squares, as one process computes them) with
    a differentiable all-reduce, whose backward all-reduces the gradients.
    Otherwise, and outside a process group, it is a plain BatchNorm. Works for (N, C) and (N, C, …).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        dist.all_reduce(count)
        mean = _AllReduceSum.apply(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims)) / count  # biased, as BatchNorm normalises with
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[operator]
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(var.detach() * (n / max(n - 1, 1.0)), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised across ranks: ``nn.SyncBatchNorm`` on CUDA, else
    ``CrossRankBatchNorm``. Parameters and buffers are the same tensors (the state dict keys do not change)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossRankBatchNorm):
        new = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                 module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


# --------------------------------------------------------------------------------------------------
# Training state on disk
# --------------------------------------------------------------------------------------------------


def _flatten_optimizer(sd: dict[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser state dict as (tensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict[str, Any], prefix: str) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            pid, key = name[len(head):].split(".", 1)
            state.setdefault(int(pid), {})[key] = value
    for pid, entry in info.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def _int64_bytes(values: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64).view(torch.uint8)


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states (torch CPU, CUDA, Python, NumPy) as uint8 tensors + a few scalars."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, mt, gauss = random.getstate()
    tensors["python"] = _int64_bytes([version, *mt])
    np_name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["numpy"] = _int64_bytes([*keys.tolist(), pos, has_gauss])
    return tensors, {"python_gauss": gauss, "numpy_name": np_name, "numpy_cached": cached}


def restore_rng(tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = tensors["python"].view(torch.int64).tolist()
    random.setstate((py[0], tuple(py[1:]), extra.get("python_gauss")))
    npv = tensors["numpy"].view(torch.int64).tolist()
    np.random.set_state(
        (extra.get("numpy_name", "MT19937"), np.array(npv[:-2], dtype=np.uint32), npv[-2], npv[-1],
         extra.get("numpy_cached", 0.0))
    )


@dataclass
class Position:
    """Where training stands: the next batch to run is ``batch`` of epoch ``epoch`` (both from 0)."""

    epoch: int = 0
    batch: int = 0


@dataclass
class TrainingState:
    """A training checkpoint as read back from disk."""

    kind: str
    position: Position
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]]  # rank → (tensors, extra)
    config_toml: str
    epoch_sums: list[float] | None
    extra: dict[str, Any] = field(default_factory=dict)


def save_training_state(
    path: str | Path,
    *,
    kind: str,
    position: Position,
    model: nn.Module,
    optimizer: Lookahead | torch.optim.Optimizer,
    config_toml: str,
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
    epoch_sums: list[float] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the full training state atomically (one safetensors file).

    ``rng``: one ``capture_rng()`` per rank (rank order). ``epoch_sums``: the running metric sums of a
    partly done epoch (mid-epoch checkpoints).
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {}
    if isinstance(optimizer, Lookahead):
        sd = optimizer.state_dict()
        t, info = _flatten_optimizer(sd["optimizer"], "optim")
        tensors.update(t)
        flat_slow = [s for slows in sd["slow"] for s in slows]
        tensors.update({f"lookahead.slow.{i}": s for i, s in enumerate(flat_slow)})
        meta["lookahead"] = {"counter": sd["counter"], "k": sd["k"], "alpha": sd["alpha"]}
    else:
        t, info = _flatten_optimizer(optimizer.state_dict(), "optim")
        tensors.update(t)
    meta["optimizer"] = info
    rng_extra = {}
    for rank, (rt, rx) in enumerate(rng):
        tensors.update({f"rng.{rank}.{k}": v for k, v in rt.items()})
        rng_extra[str(rank)] = rx
    header = {
        "format": STATE_FORMAT,
        "format_version": str(STATE_FORMAT_VERSION),
        "kind": kind,
        "epoch": str(position.epoch),
        "batch": str(position.batch),
        "config": config_toml,
        "state": json.dumps({**meta, "rng": rng_extra, "epoch_sums": epoch_sums, "extra": extra or {}}),
    }
    ckpt.save_tensors(path, tensors, header)


def load_training_state(path: str | Path, kind: str) -> TrainingState:
    """Read a training checkpoint written by ``save_training_state`` (clear errors otherwise)."""
    tensors, meta = ckpt.load_tensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a carso training checkpoint")
    version = int(meta.get("format_version", "0"))
    if version > STATE_FORMAT_VERSION:
        raise CheckpointError(f"{path} has training-state format {version}; this carso reads up to {STATE_FORMAT_VERSION}")
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is a {meta.get('kind')} training checkpoint, not a {kind} one")
    info = json.loads(meta["state"])
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    inner = _unflatten_optimizer(tensors, info["optimizer"], "optim")
    if "lookahead" in info:
        slow = [tensors[f"lookahead.slow.{i}"] for i in range(sum(1 for k in tensors if k.startswith("lookahead.slow.")))]
        optimizer: dict[str, Any] = {"optimizer": inner, "slow_flat": slow, **info["lookahead"]}
    else:
        optimizer = inner
    rng: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}
    for name, value in tensors.items():
        if name.startswith("rng."):
            _, rank, key = name.split(".", 2)
            rng.setdefault(int(rank), ({}, info["rng"].get(rank, {})))[0][key] = value
    return TrainingState(
        kind=kind,
        position=Position(int(meta["epoch"]), int(meta["batch"])),
        model=model,
        optimizer=optimizer,
        rng=rng,
        config_toml=meta["config"],
        epoch_sums=info.get("epoch_sums"),
        extra=info.get("extra", {}),
    )


def check_resume(state: TrainingState, global_batch: int, preset: str | None, name: str) -> None:
    """Options a resumed run cannot change: the global batch (the batch composition and the position
    within an epoch depend on it) and the preset (``--preset``, if given again, must name the run's)."""
    if preset is not None:
        from carso_cli.config import load_config

        if load_config(preset).name != name:
            raise ConfigError(f"--preset {preset} is not the preset of the run being resumed ('{name}')")
    trained = state.extra.get("global_batch")
    if trained is not None and int(trained) != global_batch:
        raise ConfigError(f"the run was trained with a global batch of {trained}; it cannot change on resume")


def load_optimizer_state(optimizer: Lookahead | torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore an optimiser (Lookahead included) from ``TrainingState.optimizer``."""
    if isinstance(optimizer, Lookahead):
        if "slow_flat" not in state:
            raise CheckpointError("the checkpoint has no Lookahead state")
        slow, flat, i = [], state["slow_flat"], 0
        for slows in optimizer.slow:
            slow.append(flat[i:i + len(slows)])
            i += len(slows)
        if i != len(flat):
            raise CheckpointError("the checkpoint's Lookahead slow weights do not match the model")
        optimizer.load_state_dict({"optimizer": state["optimizer"], "slow": slow, "counter": state["counter"]})
    else:
        optimizer.load_state_dict(state)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl`` (the whole file rewritten atomically)."""
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    ckpt.atomic_write_text(path, old + json.dumps(record) + "\n")


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop the lines of epochs ≥ ``epoch`` (a resumed run rewrites them)."""
    if not path.is_file():
        return
    keep = [line for line in read_metrics(path) if line.get("epoch", -1) < epoch]
    ckpt.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.strip():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                raise CheckpointError(f"{path}: not a metrics file (bad JSON line)") from None
    return lines


# --------------------------------------------------------------------------------------------------
# Randomness keyed by (seed, epoch, batch)
# --------------------------------------------------------------------------------------------------


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integers (seed, epoch, batch, stream…): distinct keys → unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (k + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def batch_generator(device: torch.device, *keys: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derived_seed(*keys))
    return gen


def epoch_batches(n_examples: int, global_batch: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled global batches of an epoch (dataset indices); the last partial batch is dropped."""
    perm = torch.randperm(n_examples, generator=batch_generator(torch.device("cpu"), seed, epoch, -1))
    count = n_examples // global_batch
    return [perm[i * global_batch:(i + 1) * global_batch] for i in range(count)]


class _ListSampler(torch.utils.data.Sampler[int]):
    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------


class StopSignal:
    """While active, SIGINT/SIGTERM set ``requested`` instead of killing; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------------
# The epoch loop
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One step's data: this rank's rows ``lo:hi`` of global batch ``index`` (size ``global_size``)."""

    epoch: int
    index: int
    x: torch.Tensor
    y: torch.Tensor
    lo: int
    hi: int
    global_size: int


@dataclass
class LoopSpec:
    """What the shared loop needs to know (both training commands fill one in)."""

    ctx: DistContext
    dataset: torch.utils.data.Dataset
    global_batch: int
    epochs: int
    seed: int
    sums: list[str]  # names of the per-batch sums ``compute`` returns; the last one is the example count
    title: str = "training"
    num_workers: int = 0
    checkpoint_every: int = 1
    metrics_path: Path | None = None  # written by rank 0 only


@dataclass
class LoopHooks:
    """The command-specific parts of a training step.

    - ``start_epoch(epoch) → dict``: set LR/β for the epoch; returns the values to log (e.g. lr, beta).
    - ``compute(batch) → Tensor``: forward and backward; returns the local sums (float64, ``len(sums)``).
    - ``update()``: the optimiser step (called only once the loss is known to be finite on all ranks).
    - ``display(sums) → dict``: per-example metrics from the summed values (progress and metrics.jsonl).
    - ``save(position, epoch_sums)``: write a consistent checkpoint (called on every rank: it gathers).
    """

    start_epoch: Callable[[int], dict[str, float]]
    compute: Callable[[Batch], torch.Tensor]
    update: Callable[[], None]
    display: Callable[[list[float]], dict[str, float]]
    save: Callable[[Position, list[float] | None], None]


def _all_reduce(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.distributed:
        # gloo and NCCL both reduce float64 on their device; NCCL needs the tensor on the GPU.
        values = values.to(ctx.device)
        dist.all_reduce(values)
    return values.cpu()


def _loader(spec: LoopSpec, batches: list[torch.Tensor], start: int, lo: int, hi: int, epoch: int):
    """A loader over this rank's rows of ``batches[start:]`` (exactly one local batch per step).

    Its generator (worker seeds) is keyed by (seed, epoch), so it draws nothing from the global RNG.
    """
    from carso_cli.data import make_loader

    indices = [int(i) for b in batches[start:] for i in b[lo:hi]]
    return make_loader(spec.dataset, hi - lo, shuffle=False, device=spec.ctx.device, num_workers=spec.num_workers,
                       seed=derived_seed(spec.seed, epoch, -2), drop_last=False, sampler=_ListSampler(indices))


def local_batches(spec: LoopSpec, epoch: int, start: int = 0) -> Iterator[Batch]:
    """This rank's batches of epoch ``epoch`` from batch ``start`` on (the data order of ``run_loop``)."""
    n = len(spec.dataset)  # type: ignore[arg-type]
    part = shard(spec.global_batch, spec.ctx.rank, spec.ctx.world_size)
    batches = epoch_batches(n, spec.global_batch, spec.seed, epoch)
    for index, (x, y) in enumerate(_loader(spec, batches, start, part.start, part.stop, epoch), start=start):
        yield Batch(epoch, index, x, y, part.start, part.stop, spec.global_batch)


def run_loop(spec: LoopSpec, hooks: LoopHooks, start: Position, carried_sums: list[float] | None = None,
             console: Any = None) -> list[dict[str, Any]]:
    """Run epochs ``start.epoch … spec.epochs-1`` (from batch ``start.batch`` in the first one).

    Per batch: ``compute`` (forward, backward), one all-reduce of [sums…, stop flag], a finiteness check
    naming epoch and batch (before the optimiser step, so the last checkpoint stays good), ``update``.
    Per epoch: one line in ``metrics.jsonl`` and, every ``checkpoint_every`` epochs and at the end, a
    checkpoint. Ctrl-C / SIGTERM: the current batch finishes, a mid-epoch checkpoint is written, and
    ``TrainingInterrupted`` is raised. Returns the epoch records written.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    ctx = spec.ctx
    n = len(spec.dataset)  # type: ignore[arg-type]
    if n < spec.global_batch:
        raise TrainingError(
            f"the training set has {n} examples, fewer than one batch of {spec.global_batch}: lower the batch size"
        )
    if spec.global_batch < ctx.world_size:
        raise TrainingError(f"a global batch of {spec.global_batch} cannot be split across {ctx.world_size} processes")
    records: list[dict[str, Any]] = []
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not ctx.is_main,
        transient=False,
    )
    batches_per_epoch = n // spec.global_batch
    with StopSignal() as stop, progress:
        epochs_task = progress.add_task(f"{spec.title}: epochs", total=spec.epochs, completed=start.epoch, info="")
        for epoch in range(start.epoch, spec.epochs):
            first = start.batch if epoch == start.epoch else 0
            schedule = hooks.start_epoch(epoch)
            sums = torch.tensor(
                carried_sums if (carried_sums and epoch == start.epoch and first > 0) else [0.0] * len(spec.sums),
                dtype=torch.float64,
            )
            batch_task = progress.add_task(f"epoch {epoch}", total=batches_per_epoch, completed=first, info="")
            t0 = time.perf_counter()
            images = 0
            index = first - 1
            for batch in local_batches(spec, epoch, first):
                index = batch.index
                local = hooks.compute(batch).detach().to(torch.float64).cpu()
                flag = torch.tensor([1.0 if stop.requested else 0.0], dtype=torch.float64)
                reduced = _all_reduce(torch.cat([local, flag]), ctx)
                step_sums, stop_now = reduced[:-1], bool(reduced[-1] > 0)
                if not torch.isfinite(step_sums).all():
                    raise TrainingError(
                        f"non-finite loss at epoch {epoch}, batch {index} "
                        f"({', '.join(f'{k}={v:.4g}' for k, v in zip(spec.sums, step_sums.tolist()))}); "
                        "the last good checkpoint is kept — lower the learning rate or check the data"
                    )
                hooks.update()
                sums += step_sums
                images += spec.global_batch
                shown = hooks.display(step_sums.tolist())
                rate = images / max(time.perf_counter() - t0, 1e-9)
                info = "  ".join([f"{rate:,.0f} img/s"] + [f"{k} {v:.4g}" for k, v in {**shown, **schedule}.items()])
                progress.update(batch_task, completed=index + 1, info=info)
                if stop_now and not (epoch == spec.epochs - 1 and index + 1 == batches_per_epoch):
                    position = Position(epoch, index + 1)
                    if position.batch == batches_per_epoch:
                        position = Position(epoch + 1, 0)  # the epoch is complete
                        _finish_epoch(spec, hooks, epoch, sums, schedule, t0, images, index + 1, records)
                        hooks.save(position, None)
                    else:
                        hooks.save(position, sums.tolist())
                    raise TrainingInterrupted(
                        f"stopped by {stop.requested or 'a signal on another rank'} at epoch {position.epoch}, "
                        f"batch {position.batch}: a consistent checkpoint was saved — continue with --resume"
                    )
            progress.remove_task(batch_task)
            _finish_epoch(spec, hooks, epoch, sums, schedule, t0, images, index + 1, records)
            progress.update(epochs_task, completed=epoch + 1)
            last = epoch == spec.epochs - 1
            if last or (epoch + 1) % max(1, spec.checkpoint_every) == 0:
                hooks.save(Position(epoch + 1, 0), None)
    return records


def _finish_epoch(spec: LoopSpec, hooks: LoopHooks, epoch: int, sums: torch.Tensor, schedule: dict[str, float],
                  t0: float, images: int, batches: int, records: list[dict[str, Any]]) -> None:
    elapsed = time.perf_counter() - t0
    record = {"epoch": epoch, **hooks.display(sums.tolist()), **schedule, "batches": batches,
              "images_per_s": images / max(elapsed, 1e-9), "time_s": elapsed}
    records.append(record)
    if spec.ctx.is_main and spec.metrics_path is not None:
        append_metrics(spec.metrics_path, record)


def gather_rng(ctx: DistContext) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Every rank's RNG states, in rank order, on rank 0 (an empty list elsewhere)."""
    mine = capture_rng()
    everything = gather_objects(mine, ctx)
    return list(everything) if everything is not None else []


def restore_rank_rng(state: TrainingState, ctx: DistContext) -> None:
    """Restore this rank's RNG states (if the checkpoint has them for this rank)."""
    if ctx.rank in state.rng:
        restore_rng(*state.rng[ctx.rank])


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch, Python and NumPy (rank-dependent, so ranks augment differently)."""
    s = derived_seed(seed, rank, 7)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % (2**32))


def check_gpus(gpus: int, device: str | None) -> None:
    """``--gpus N`` on CUDA needs N visible GPUs (one process per GPU); on CPU it means N gloo processes."""
    wants_cuda = device is None or device.startswith("cuda")
    if gpus > 1 and wants_cuda and torch.cuda.is_available() and gpus > torch.cuda.device_count():
        raise ConfigError(f"--gpus {gpus}: only {torch.cuda.device_count()} CUDA device(s) visible on this node")
