"""Shared fixtures: tiny models on the smoke preset, and run directories built from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
