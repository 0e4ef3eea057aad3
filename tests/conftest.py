"""Shared fixtures: tiny models on the smoke preset, and run directories built from them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from carso_cli import checkpoint as ckpt
from carso_cli.config import Config, load_config
from carso_cli.models import build_classifier, build_purifier, write_run

torch.set_num_threads(2)


@pytest.fixture
def smoke_cfg() -> Config:
    return load_config("smoke")


def make_random_run(run_dir: Path, cfg: Config | None = None, seed: int = 0) -> Path:
    """A complete run directory with randomly initialised smoke models (untrained, but well-formed)."""
    cfg = cfg or load_config("smoke")
    torch.manual_seed(seed)
    classifier = build_classifier(cfg).eval()
    purifier = build_purifier(cfg, classifier).eval()
    return write_run(run_dir, cfg, classifier, purifier)


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    """An untrained smoke run directory under a temporary path."""
    return make_random_run(tmp_path / "runs" / "smoke-tiny")


# Overrides of the fixture below: a shortened adversarial training of the smoke classifier (PGD at a
# smaller ε, one step, two epochs: about 65% clean test accuracy in ~10 s), then the smoke purifier as
# the preset has it (6 epochs, ~30 s; CARSO's clean test accuracy about 50%, chance being 10%).
TRAINED_SMOKE_CLASSIFIER = {
    "classifier_training.epochs": 2,
    "classifier_training.pgd_steps": 1,
    "classifier_training.pgd_step_size": "3/255",
    "attacks.eps": "2/255",
}
TRAINED_SMOKE_PURIFIER: dict[str, object] = {}


@pytest.fixture(scope="session")
def classifier_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random smoke classifier weights, seed 0 (what training needs is a classifier, not a good one).
    Shared by the session: read it, never write next to it."""
    path = tmp_path_factory.mktemp("classifier") / "classifier.safetensors"
    torch.manual_seed(0)
    ckpt.save_tensors(path, build_classifier(load_config("smoke")).state_dict())
    return path


@pytest.fixture(scope="session")
def trained_smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run trained for real with ``train-classifier`` and ``train-purifier`` (CPU, about a minute).

    The classifier is adversarially trained (shortened, see TRAINED_SMOKE_CLASSIFIER); the run's
    config is the smoke preset. CARSO's clean accuracy on the synthetic test set is well above chance.
    Returns the run directory (config.toml, classifier.safetensors, purifier.safetensors,
    metrics.jsonl, checkpoints/last.safetensors, curves.png).
    """
    from carso_cli.commands import train_classifier, train_purifier

    # CARSO_SMOKE_SEED=N reseeds both trainings: the no-false-alarm tests must pass on any such model
    # (issue 23), e.g. ``CARSO_SMOKE_SEED=1 pytest -m slow tests/test_sanity.py``.
    seed = int(os.environ.get("CARSO_SMOKE_SEED", "0"))
    root = tmp_path_factory.mktemp("trained-smoke")
    cpu = torch.device("cpu")
    classifier = train_classifier.run(
        load_config("smoke", TRAINED_SMOKE_CLASSIFIER),
        root / "classifier.safetensors",
        device=cpu,
        evaluate=False,
        seed=seed,
    ).weights
    return train_purifier.run(
        load_config("smoke", TRAINED_SMOKE_PURIFIER), classifier, root / "run", device=cpu, seed=seed
    ).run


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu``-marked tests need CUDA: skipped (with the reason shown) where there is none, as in CI."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _mutation_from_environment() -> Iterator[None]:
    """``CARSO_MUTATION=attack:kind`` (tests/mutations.py) mutates the adaptive evaluation for every test
    of the session, to list the tests that catch that mutation (in-process evaluations only: a test that
    runs ``carso`` in a subprocess does not see it)."""
    text = os.environ.get("CARSO_MUTATION")
    if not text:
        yield
        return
    import mutations

    with pytest.MonkeyPatch.context() as mp:
        mutations.apply(mp, *mutations.parse(text))
        yield
