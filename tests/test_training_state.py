"""carso_cli.training.state: training-state files (model, optimiser, RNG) and their errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from carso_cli import training as tr
from carso_cli.errors import CheckpointError


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = tr.Lookahead(torch.optim.RAdam(model.parameters(), lr=0.01), k=3, alpha=0.8)
    return model, opt


def _steps(model, opt, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_training_state_round_trip(tmp_path) -> None:
    """Saving and loading model, RAdam + Lookahead state and RNG states continues bit for bit."""
    model, opt = _model_and_optimizer(0)
    _steps(model, opt, 4, seed=1)  # mid-way through a Lookahead cycle
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    path = tmp_path / "state.safetensors"
    tr.save_training_state(
        path,
        kind="test",
        position=tr.Position(3, 2),
        model=model,
        optimizer=opt,
        config_toml="name = 'x'\n",
        rng=[tr.capture_rng()],
        epoch_sums=[1.0, 2.0],
        extra={"seed": 7},
    )
    draws = (torch.rand(3), random.random(), np.random.rand())
    _steps(model, opt, 5, seed=2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2 = _model_and_optimizer(99)
    state = tr.load_training_state(path, "test")
    model2.load_state_dict(state.model)
    tr.load_optimizer_state(opt2, state.optimizer)
    tr.restore_rng(*state.rng[0])
    assert state.position == tr.Position(3, 2) and state.epoch_sums == [1.0, 2.0] and state.extra == {"seed": 7}
    assert state.config_toml == "name = 'x'\n" and opt2.counter == 4
    assert torch.equal(draws[0], torch.rand(3)) and draws[1] == random.random() and draws[2] == np.random.rand()
    _steps(model2, opt2, 5, seed=2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k]), k

    with pytest.raises(CheckpointError, match="is a test training checkpoint, not a purifier one"):
        tr.load_training_state(path, "purifier")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        tr.load_training_state(tmp_path / "junk.safetensors", "test")
