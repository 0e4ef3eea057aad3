"""``training.compile`` / ``--compile``: torch.compile of the attacked classifier and the purifier's training
pass, falling back to eager when compiling fails (``carso_cli.training.compiled``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from carso_cli import checkpoint as ckpt
from carso_cli.cli import app
from carso_cli.config import load_config
from carso_cli.training.compiled import CompiledOrEager

runner = CliRunner()
TINY = [
    "--set",
    "data.synthetic_train_size=32",
    "--set",
    "training.batch_size=16",
    "--set",
    "training.epochs=1",
    "--set",
    "attacks.pgd_steps=2",
    "--device",
    "cpu",
]
FAILING = "carso_test_failing_backend"


@pytest.fixture(scope="module")
def plain(classifier_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _train(tmp_path_factory.mktemp("plain") / "run", classifier_file)[0]


def _train(out: Path, classifier_file: Path, *extra: str) -> tuple[dict[str, torch.Tensor], str]:
    result = runner.invoke(
        app,
        ["train-purifier", "--preset", "smoke", "--classifier", str(classifier_file), "--out", str(out), *TINY, *extra],
    )
    assert result.exit_code == 0, result.output
    return ckpt.load_tensors(out / ckpt.PURIFIER_FILE)[0], " ".join(result.output.split())


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_with_the_eager_backend_is_the_eager_run(tmp_path: Path, classifier_file: Path, plain) -> None:
    """Dynamo captures both modules (graphs counted) and, with the backend that runs the captured
    graphs as they are, the trained purifier is bitwise the eager one; the config records the backend."""
    from torch._dynamo.utils import counters

    counters.clear()
    trained, _ = _train(tmp_path / "run", classifier_file, "--compile", "eager")
    assert counters["stats"]["unique_graphs"] >= 2  # the attacked classifier and the training pass
    assert _equal(trained, plain)
    assert load_config(tmp_path / "run" / "config.toml").training.compile == "eager"


def test_a_failing_compiler_falls_back_to_eager_and_says_so(tmp_path: Path, classifier_file: Path, plain) -> None:
    from torch._dynamo import register_backend

    calls: list[int] = []

    def failing(gm, example_inputs):  # as a missing C++ compiler or an unsupported operation would
        calls.append(1)
        raise RuntimeError("simulated compiler failure")

    register_backend(failing, name=FAILING)
    trained, output = _train(tmp_path / "run", classifier_file, "--compile", FAILING)
    assert f"torch.compile ({FAILING}) failed for the attacked classifier" in output
    assert "continuing without it" in output
    assert _equal(trained, plain)  # the eager run, bitwise
    assert len(calls) == 2  # once per compiled module, then eager for good


def test_an_unknown_backend_is_one_line_and_leaves_nothing(tmp_path: Path, classifier_file: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(classifier_file),
            "--out",
            str(tmp_path / "run"),
            *TINY,
            "--compile",
            "nonsense",
        ],
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "training.compile = 'nonsense': not a torch.compile backend" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_the_eager_error_wins_and_out_of_memory_passes_through() -> None:
    """A call that fails eagerly too raises the eager error (a real bug is not hidden as a compile
    failure); out-of-memory is re-raised as it is, for the bounds' retry, without an eager call."""

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("a real bug")

    said: list[str] = []
    wrapped = CompiledOrEager(Broken(), "eager", "test", said.append)
    with pytest.raises(ValueError, match="a real bug"):
        wrapped(torch.zeros(1))
    assert not said

    eager_calls: list[int] = []

    class Counting(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            eager_calls.append(1)
            return x

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    wrapped = CompiledOrEager(Counting(), "eager", "test", said.append)
    wrapped.compiled = out_of_memory
    with pytest.raises(torch.cuda.OutOfMemoryError):
        wrapped(torch.zeros(1))
    assert not eager_calls and not said and wrapped.compiled is out_of_memory
