"""Randomness keyed by (seed, epoch, batch), and each process's RNG states (capture, restore, seed)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from carso_cli.distributed import DistContext, gather_objects


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


def epoch_batches(
    n_examples: int, global_batch: int, seed: int, epoch: int, drop_last: bool = True, min_last: int = 1
) -> list[torch.Tensor]:
    """The shuffled global batches of an epoch (dataset indices).

    The last partial batch is dropped (``training.drop_last``, the default), or kept when it has at least
    ``min_last`` examples (one per process: the authors' DataLoader keeps it, Table of docs/FIDELITY.md).
    """
    perm = torch.randperm(n_examples, generator=batch_generator(torch.device("cpu"), seed, epoch, -1))
    count = n_examples // global_batch
    batches = [perm[i * global_batch : (i + 1) * global_batch] for i in range(count)]
    if not drop_last and n_examples - count * global_batch >= max(1, min_last):
        batches.append(perm[count * global_batch :])
    return batches


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
        (
            extra.get("numpy_name", "MT19937"),
            np.array(npv[:-2], dtype=np.uint32),
            npv[-2],
            npv[-1],
            extra.get("numpy_cached", 0.0),
        )
    )


def gather_rng(ctx: DistContext) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Every rank's RNG states, in rank order, on rank 0 (an empty list elsewhere)."""
    mine = capture_rng()
    everything = gather_objects(mine, ctx)
    return list(everything) if everything is not None else []


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch, Python and NumPy (rank-dependent, so ranks augment differently)."""
    s = derived_seed(seed, rank, 7)
    torch.manual_seed(s)
    random.seed(s)
    # NumPy takes 32 bits: fold the high half in (the hash's low bits barely depend on the keys' high bits).
    np.random.seed((s ^ (s >> 32)) & 0xFFFFFFFF)
