"""``carso_cli.training.loop``: the data order of an epoch and its (seeded, per-example) augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carso_cli import training as tr
from carso_cli.config import load_config
from carso_cli.data import build_dataset
from carso_cli.distributed import DistContext


def _spec(
    tmp_path: Path, augment: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> tr.LoopSpec:
    cfg = load_config("smoke", {"data.synthetic_train_size": 40, "data.augment": augment})
    return tr.LoopSpec(
        ctx=DistContext(rank=rank, world_size=world_size),
        dataset=build_dataset(cfg, "train", tmp_path),
        global_batch=8,
        epochs=2,
        seed=seed,
        sums=["n"],
        num_workers=num_workers,
    )


def _images(spec: tr.LoopSpec, epoch: int, start: int = 0) -> list[torch.Tensor]:
    return [b.x for b in tr.local_batches(spec, epoch, start)]


def test_augmentation_is_seeded_by_the_run_seed_not_the_global_rng(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = _images(spec, 0)
    assert torch.equal(torch.get_rng_state(), before)  # reading augmented batches draws nothing globally
    torch.manual_seed(2)
    assert all(torch.equal(a, b) for a, b in zip(first, _images(spec, 0)))
    assert not torch.equal(first[0], _images(_spec(tmp_path, seed=1), 0)[0])  # another run seed
    assert not torch.equal(first[0], _images(spec, 1)[0])  # another epoch

    plain = _spec(tmp_path, augment=False)
    order = tr.epoch_batches(40, 8, 0, 0)
    unaugmented = _images(plain, 0)
    assert torch.equal(unaugmented[0], torch.stack([plain.dataset[int(i)][0] for i in order[0]]))
    changed = [not torch.equal(a, b) for a, b in zip(first[0], unaugmented[0])]
    assert sum(changed) >= 4  # cropped or flipped: most of 8 examples differ from the stored image


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_epoch_gives_the_batches_of_an_uninterrupted_one(tmp_path: Path, num_workers: int) -> None:
    whole = _images(_spec(tmp_path, num_workers=num_workers), 1)
    resumed = _images(_spec(tmp_path, num_workers=num_workers), 1, start=2)
    assert len(whole) == 5 and len(resumed) == 3
    assert all(torch.equal(a, b) for a, b in zip(whole[2:], resumed))
    if num_workers:  # workers (their own processes and RNGs) augment as the main process does
        assert all(torch.equal(a, b) for a, b in zip(whole, _images(_spec(tmp_path), 1)))


def test_two_processes_see_the_rows_of_one(tmp_path: Path) -> None:
    one = _images(_spec(tmp_path), 0)
    ranks = [_images(_spec(tmp_path, rank=r, world_size=2), 0) for r in (0, 1)]
    for whole, a, b in zip(one, *ranks):
        assert a.shape[0] == 4 and torch.equal(torch.cat([a, b]), whole)
