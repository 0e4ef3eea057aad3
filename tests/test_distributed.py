"""carso_cli.distributed: relaunch argv."""

from __future__ import annotations

from carso_cli import distributed


def test_relaunch_argv() -> None:
    argv = distributed.relaunch_argv(
        "train-purifier",
        preset="smoke",
        out=None,
        resume=False,
        gpus=2,
        bf16=True,
        set=["training.epochs=1", "data.num_workers=0"],
    )
    assert argv == [
        "train-purifier",
        "--preset",
        "smoke",
        "--gpus",
        "2",
        "--bf16",
        "--set",
        "training.epochs=1",
        "--set",
        "data.num_workers=0",
    ]
