"""The public Python API: a trained run as a plain ``torch.nn.Module`` for outside code.

``load`` gives the CARSO model end to end (section 4: classifier → representation → purifier decoder →
classifier → robust aggregation), ``load_classifier`` the adversarially-trained classifier alone. Both
take [0, 1] images ``(N, C, H, W)`` and return class scores ``(N, classes)``, are in eval mode with
frozen parameters and differentiable with respect to the input — what AutoAttack, torchattacks or
RobustBench's ``benchmark`` expect (as RobustBench's ``load_model`` does). ``carso predict`` loads runs
through here too, so there is one loading path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from carso_cli.aggregation import AGGREGATIONS
from carso_cli.errors import CarsoError
from carso_cli.models.carso import CARSO


def resolve(run_or_name: str | Path | None) -> Path | None:
    """Where a run lives: a path as given (None = the latest under ./runs; ``checkpoint.resolve_run``
    checks it).

    A bare name that is not a folder here is looked up in the model zoo (``carso_cli/zoo.toml``): its
    files are downloaded (cached) and converted into ``runs/NAME`` as ``carso pull NAME`` does.
    """
    if run_or_name is None:
        return None
    path = Path(run_or_name)
    if path.exists() or len(path.parts) > 1 or str(run_or_name).startswith("."):
        return path
    from carso_cli import zoo

    if str(run_or_name) not in zoo.entries():
        zoo.get(str(run_or_name))  # the zoo's error, with the closest names
    pulled = zoo.pull(str(run_or_name))
    if pulled.run is None:
        raise CarsoError(
            f"{run_or_name} is a classifier without a published purifier: "
            f"use carso_cli.load_classifier or train a purifier for it"
        )
    return pulled.run


def example_latents(seed: int | str, indices: range, samples: int, dim: int) -> torch.Tensor:
    """z of shape (samples, len(indices), dim): column j drawn from a generator seeded by (seed, indices[j]).

    Drawn on the CPU, so the same seed gives the same z (and answer) on every device.
    """
    columns = []
    for i in indices:
        # The CPU generator (mt19937) keeps only 32 bits of its seed: hash (seed, i) down to 32 bits
        # rather than packing them, which would make every seed draw the same z.
        key = int.from_bytes(hashlib.blake2b(f"{seed}/{i}".encode(), digest_size=4).digest(), "little")
        gen = torch.Generator().manual_seed(key)
        columns.append(torch.randn(samples, dim, generator=gen))
    return torch.stack(columns, dim=1)


class SeededLatents:
    """A ``CARSO.latent_sampler`` drawing reproducible z from ``seed``: new z at every forward.

    Forward k (from 0) draws row j's z from (seed, k, j); forward 0 draws exactly what ``carso predict
    --seed SEED`` draws for the j-th image, so a fresh model and the command agree.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.calls = 0

    def __call__(self, n: int, b: int, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key: int | str = self.seed if self.calls == 0 else f"{self.seed}:{self.calls}"
        self.calls += 1
        return example_latents(key, range(b), n, d).to(device=device, dtype=dtype)


def _device(device: str | torch.device | None) -> torch.device:
    try:
        return torch.device("cpu" if device is None else device)
    except RuntimeError:
        raise CarsoError(f"unknown device '{device}' (use cpu, cuda or cuda:N)") from None


def load(
    run_or_name: str | Path | None = None,
    *,
    aggregation: str | None = None,
    samples: int | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
) -> CARSO:
    """The CARSO model of a run, in eval mode: ``model(x)`` with x in [0, 1] → scores (N, classes).

    Args:
        run_or_name: a run directory (default: the latest under ./runs).
        aggregation: "dexp" (the paper, section 4.5), "dexp-logsum", "logit", "prob" or "vote"
            (default: the run's preset).
        samples: reconstructions per input (default: the preset's; 0 = one deterministic one, z = 0).
        device: where the model lives (default: cpu; ``.to()`` moves it like any module).
        seed: None draws z from torch's global generator (``torch.manual_seed`` fixes it); an int
            draws them from a stream of their own (see ``SeededLatents``).

    The module has ``config`` (the run's resolved preset) and ``run_dir`` attributes. Scores are
    stochastic as CARSO is (each forward draws new z), and differentiable with respect to x.
    """
    from carso_cli.models import load_run

    if aggregation is not None and aggregation not in AGGREGATIONS:
        raise CarsoError(f"unknown aggregation '{aggregation}' (choose from {', '.join(AGGREGATIONS)})")
    if samples is not None and samples < 0:
        raise CarsoError(f"samples must be ≥ 0 (got {samples})")
    loaded = load_run(resolve(run_or_name), _device(device))
    model = loaded.carso(samples=samples, aggregation=aggregation).eval()  # the wrapper too, not only its parts
    if seed is not None:
        model.latent_sampler = SeededLatents(seed)
    model.config = loaded.cfg
    model.run_dir = loaded.run
    return model


def load_classifier(run_or_name: str | Path | None = None, *, device: str | torch.device | None = None) -> nn.Module:
    """The run's (adversarially-trained) classifier alone, in eval mode: x in [0, 1] → logits (N, classes)."""
    model = load(run_or_name, device=device)
    classifier = model.classifier
    classifier.config, classifier.run_dir = model.config, model.run_dir
    return classifier
