"""Memory bounds of a training step (``--attack-chunk``, ``--micro-batch``; issue 9): split, resolve, retry.

Both commands bound the same two things: how many examples are attacked at once, and how many go
through one forward/backward before the gradients are accumulated. With several processes, every rank
must cut its rows into the *same number* of pieces: each piece's forward runs collectives
(SyncBatchNorm, DDP's last backward), and a rank with one call more than the others would wait forever.
The count therefore comes from the largest shard of the global batch (``pieces``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

from carso_cli import memory
from carso_cli.errors import CarsoError

T = TypeVar("T")


def pieces(global_size: int, world_size: int, size: int | None) -> int | None:
    """How many pieces each rank cuts its rows into for a bound ``size`` (None: no bound, one piece).

    From the largest shard (``ceil(global / world)`` rows), so all ranks agree; a smaller shard's pieces
    are then at most ``size`` rows too.
    """
    if not size:
        return None
    largest = -(-global_size // world_size)
    return max(1, -(-largest // size))


@dataclasses.dataclass
class Bounds:
    """The bounds in use: a count, None (the whole batch) or "auto".

    "auto" is resolved at the first batch from the device's free memory and the command's measured
    footprint (on the CPU: the whole batch). On CUDA out-of-memory, "auto" bounds are halved and the
    batch retried once; explicit ones are reported with what would fit (``run_bounded``).
    """

    chunk: int | str | None
    micro: int | str | None
    halved: bool = False

    def __post_init__(self) -> None:
        self.auto = "auto" in (self.chunk, self.micro)

    @classmethod
    def of(cls, attack_chunk: int | str, micro_batch: int | str) -> Bounds:
        """From a config's values, which ``config.validate`` checked: a count, 0 (the whole batch) or "auto"."""
        return cls(attack_chunk or None, micro_batch or None)

    def resolve(self, n: int, device: torch.device, footprint: Callable[[], tuple[int, int, int]]) -> None:
        """Turn "auto" into counts; ``footprint() → (static bytes, per attacked example, per trained example)``."""
        if self.chunk != "auto" and self.micro != "auto":
            return
        if device.type != "cuda":
            self.chunk = None if self.chunk == "auto" else self.chunk
            self.micro = None if self.micro == "auto" else self.micro
            return
        static, per_attack, per_step = footprint()
        if self.chunk == "auto":
            self.chunk = memory.auto_chunk(device, static, per_attack, n)
        if self.micro == "auto":
            self.micro = memory.auto_chunk(device, static, per_step, n)

    def halve_auto(self, n: int, attacked: int | None = None) -> bool:
        """Halve the automatic bounds once (an unbounded chunk: half of the ``attacked`` examples the
        largest attack call had, default ``n``); False when there is nothing left to try."""
        if not self.auto or self.halved:
            return False
        self.halved = True
        self.chunk = max(1, int(self.chunk or attacked or n) // 2)
        self.micro = max(1, int(self.micro or n) // 2)
        return True

    @property
    def attack_chunk(self) -> int | None:
        return None if self.chunk in (None, "auto") else int(self.chunk)  # type: ignore[arg-type]

    @property
    def micro_batch(self) -> int | None:
        return None if self.micro in (None, "auto") else int(self.micro)  # type: ignore[arg-type]


def run_bounded(
    step: Callable[[], T],
    bounds: Bounds,
    n: int,
    device: torch.device,
    reset: Callable[[], None],
    fits: Callable[[], dict[str, int] | None],
    say: Callable[[str], None],
    attacked: int | None = None,
) -> T:
    """``step()``; on out-of-memory: halve "auto" bounds and retry once (``say`` tells the user; the halved
    bounds stay for the batches after), else — or when the retry fails too — one
    line (``CarsoError``) with the per-process batch ``n``, the bounds in use, the peak and ``fits()``.

    ``attacked``: the examples of the largest attack call (``Bounds.halve_auto``). ``reset`` drops what the
    failed attempt left (the partial gradients). With several processes a rank
    that runs out of memory stops the others at their next collective; the message comes from that rank.
    """
    for attempt in (0, 1):
        try:
            return step()
        except RuntimeError as exc:
            if not memory.is_out_of_memory(exc):
                raise
        reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if attempt == 1 or not bounds.halve_auto(n, attacked):
            suggestion = fits() if device.type == "cuda" else None
            raise CarsoError(
                memory.out_of_memory_message(device, n, bounds.attack_chunk, bounds.micro_batch, suggestion)
            )
        say(
            f"out of GPU memory: 'auto' halved to --attack-chunk {bounds.chunk} --micro-batch {bounds.micro}, "
            "retrying the batch once"
        )
    raise AssertionError("unreachable")
