"""Batch normalisation across ranks (the global batch's statistics, on CPU/gloo as on CUDA)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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
        new = CrossRankBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
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
