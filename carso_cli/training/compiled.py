"""``torch.compile`` for the training's hot paths, as an option that never fails a run (issue 9).

``training.compile`` (``--compile``) names a ``torch.compile`` backend ("inductor", the default one;
"off" = eager). What is compiled: the classifier as the training attacks call it (FGSM/PGD dominate a
purifier step: 40 forward/backward passes per PGD example) and the purifier's training pass. The
representation capture stays eager (its forward hooks change per call).

A compiled kernel rounds differently from the eager one (fused operations), so a compiled run is not
bitwise an eager run; the run's config records the backend. When compiling fails (no C++ compiler, an
unsupported operation, a backend error), the call is repeated eagerly: if that works, the failure was
the compiler's, the module stays eager for the rest of the run and the user is told so in one line; if
the eager call fails too, its own error is raised. Out-of-memory errors pass through untouched, for the
bounds' retry (``training.bounds``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from carso_cli import memory
from carso_cli.errors import ConfigError

OFF = "off"


class CompiledOrEager:
    """Calls ``torch.compile(module, backend=…)``; falls back to ``module`` for good on a compile failure."""

    def __init__(self, module: nn.Module, backend: str, what: str, say: Callable[[str], None]) -> None:
        self.module, self.backend, self.what, self.say = module, backend, what, say
        self.compiled: Callable[..., Any] | None = torch.compile(module, backend=backend) if backend != OFF else None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.module(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - told apart below: the eager call decides
            if memory.is_out_of_memory(exc):
                raise
            failure = exc
        out = self.module(*args, **kwargs)  # raises the real error if there is one
        self.compiled = None
        first = (str(failure).strip().splitlines() or [type(failure).__name__])[0][:200]
        self.say(
            f"torch.compile ({self.backend}) failed for the {self.what} ({type(failure).__name__}: {first}); "
            "continuing without it"
        )
        return out


def maybe_compile(module: nn.Module, backend: str, what: str, say: Callable[[str], None]) -> Callable[..., Any]:
    """``module`` itself when ``backend`` is "off", else a ``CompiledOrEager`` around it."""
    return module if backend == OFF else CompiledOrEager(module, backend, what, say)


def check_backend(backend: str) -> None:
    """``training.compile`` must be "off" or a backend this torch knows (one clear line otherwise)."""
    if backend == OFF:
        return
    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(
            f"training.compile = {backend!r}: not a torch.compile backend here; use 'off' or one of "
            f"{', '.join(sorted(known))}"
        )
