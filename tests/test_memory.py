"""Memory-bounded steps (issue 9): chunked attacks equal unchunked ones, sizes, estimates vs measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from carso_cli import attacks as atk
from carso_cli import memory
from carso_cli.config import load_config
from carso_cli.errors import CarsoError


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )
    return model.eval()


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_attacks_equal_unchunked(chunk: int) -> None:
    model = _cnn()
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(10, 3, 8, 8, generator=g), torch.randint(0, 10, (10,), generator=g)
    eps = torch.linspace(2 / 255, 8 / 255, 10)  # per-example ε, sliced alongside x
    noise = torch.rand(x.shape, generator=g)
    whole = atk.pgd(model, x, y, eps, 5, 0.01, start_noise=noise)
    parts = atk.in_chunks(atk.pgd, chunk, model, x, y, eps, 5, 0.01, start_noise=noise)
    # Per-example attacks: only float rounding of batched convolutions may differ.
    assert torch.allclose(whole, parts, atol=1e-6, rtol=0)
    assert torch.allclose(
        atk.fgsm(model, x, y, eps), atk.in_chunks(atk.fgsm, chunk, model, x, y, eps), atol=1e-6, rtol=0
    )


def test_in_chunks_calls_once_when_the_chunk_holds_the_batch() -> None:
    calls = []

    def attack(model: object, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x

    x = torch.zeros(5, 1)
    atk.in_chunks(attack, None, None, x, torch.zeros(5))
    atk.in_chunks(attack, 5, None, x, torch.zeros(5))
    atk.in_chunks(attack, 2, None, x, torch.zeros(5))
    assert calls == [5, 5, 2, 2, 1]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("80GB", 80 * 10**9),
        ("80GiB", 80 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("1000", 1000),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert memory.parse_size(text) == expected


def test_bad_sizes_and_chunks_are_clear_errors() -> None:
    with pytest.raises(CarsoError, match="80 parsecs"):
        memory.parse_size("80 parsecs")
    with pytest.raises(CarsoError, match="--attack-chunk"):
        memory.parse_chunk("lots", "--attack-chunk")
    assert memory.parse_chunk("auto", "x") == "auto"
    assert memory.parse_chunk("0", "x") is None and memory.parse_chunk(64, "x") == 64


def test_saved_bytes_counts_activations() -> None:
    lin = nn.Linear(100, 100)
    x = torch.rand(8, 100)
    small = memory.saved_bytes(lambda: lin(x).relu().sum())
    big = memory.saved_bytes(lambda: lin(torch.rand(64, 100)).relu().sum())
    # Linear saves its input, ReLU its output: 2 × B × 100 floats (the weights are not counted anew).
    assert 8 * 100 * 4 <= small <= 8 * 100 * 4 * 2 + 100 * 100 * 4
    assert big > 6 * (small - 100 * 100 * 4)


def test_estimates_grow_with_the_batch_and_chunks_bound_them(smoke_cfg) -> None:
    fp = memory.measure(smoke_cfg)
    pe = fp.per_example
    assert pe.attack > 0 and pe.purifier > 0 and pe.evaluation > pe.attack  # CARSO runs N classifier passes
    full = memory.estimate_training(fp, 256, 128)
    bounded = memory.estimate_training(fp, 256, 128, attack_chunk=16, micro_batch=16)
    assert bounded.peak < full.peak and bounded.attack_chunk == 16 and bounded.micro_batch == 16
    fits = memory.fitting_options(fp, bounded.peak, 256)
    # What fitting_options offers for a budget really fits it, and one more example would not.
    assert memory.estimate_training(fp, 256, 256, fits["attack_chunk"], fits["micro_batch"]).peak <= bounded.peak
    assert memory.estimate_training(fp, 256, 256, fits["attack_chunk"] + 1, 1).attack_phase > bounded.peak


def test_paper_preset_on_one_80gb_gpu_needs_bounded_steps() -> None:
    """The cifar10 preset's global batch of 5,120 in one piece does not fit 80 GB; bounded steps do."""
    cfg = load_config("cifar10")
    fp = memory.measure(cfg)
    batch = cfg.training.batch_size
    budget = memory.parse_size("80GB")
    assert memory.estimate_training(fp, batch, batch // 2).peak > budget
    fits = memory.fitting_options(fp, budget, batch)
    assert 0 < fits["micro_batch"] < batch and 0 < fits["attack_chunk"]
    assert memory.estimate_training(fp, batch, batch // 2, fits["attack_chunk"], fits["micro_batch"]).peak <= budget


def test_out_of_memory_message_names_the_options() -> None:
    line = memory.out_of_memory_message(torch.device("cpu"), 5120, 640, None, {"attack_chunk": 320, "micro_batch": 64})
    assert "per-process batch 5120" in line and "--attack-chunk 640" in line and "--micro-batch 5120" in line
    assert "--attack-chunk 320 --micro-batch 64 should fit" in line and "\n" not in line
    assert memory.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))


# --------------------------------------------------------------------------------------------------
# Training with bounded steps
# --------------------------------------------------------------------------------------------------


def test_accumulation_over_micro_batches_equals_one_batch(smoke_cfg) -> None:
    """For a purifier whose BatchNorm is in eval mode, micro-batches give the one-batch gradient."""
    from carso_cli import training as tr
    from carso_cli.models import build_classifier, build_purifier
    from carso_cli.models.representation import forward_with_representation
    from carso_cli.training.purifier_step import PurifierTrainStep

    torch.manual_seed(0)
    classifier = build_classifier(smoke_cfg).eval()
    purifier = build_purifier(smoke_cfg, classifier).eval()  # BN uses running statistics
    module = PurifierTrainStep(purifier)
    x = torch.rand(10, 3, 32, 32)
    noise = torch.randn(10, purifier.spec.fjoint)
    with torch.no_grad():
        _, rep = forward_with_representation(classifier, list(purifier.spec.layers), x, keep_graph=False)

    def step(part: slice) -> torch.Tensor:
        x_hat, mu, logvar = module(x[part], [r[part] for r in rep], noise[part])
        loss = tr.vae_loss(x_hat, x[part], mu, logvar, 0.5)
        (loss.total / 10).backward()
        return torch.stack([loss.total.detach(), loss.bce.detach()])

    grads, sums = [], []
    for micro in (None, 4, 3):
        purifier.zero_grad(set_to_none=True)
        sums.append(tr.accumulate(10, micro, step))
        grads.append({k: p.grad.clone() for k, p in purifier.named_parameters() if p.grad is not None})
    for other, total in zip(grads[1:], sums[1:]):
        assert other.keys() == grads[0].keys() and grads[0]
        for k in grads[0]:
            assert torch.allclose(other[k], grads[0][k], rtol=1e-4, atol=1e-6), k
        assert torch.allclose(total, sums[0], rtol=1e-5)


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


def _train(out, classifier_file, *extra: str):
    from typer.testing import CliRunner

    from carso_cli import checkpoint as ckpt
    from carso_cli.cli import app

    result = CliRunner().invoke(
        app,
        ["train-purifier", "--preset", "smoke", "--classifier", str(classifier_file), "--out", str(out), *TINY, *extra],
    )
    assert result.exit_code == 0, result.output
    return ckpt.load_tensors(out / ckpt.PURIFIER_FILE)[0]


@pytest.mark.slow
def test_cli_bounds_keep_the_result(tmp_path, classifier_file) -> None:
    """``--micro-batch`` = the batch is bitwise the plain run; ``--attack-chunk`` changes only rounding."""
    from carso_cli.config import load_config as load

    plain = _train(tmp_path / "plain", classifier_file)
    same = _train(tmp_path / "micro16", classifier_file, "--micro-batch", "16")
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    chunked = _train(tmp_path / "chunk3", classifier_file, "--attack-chunk", "3")
    assert all(torch.allclose(plain[k], chunked[k], atol=1e-5, rtol=1e-4) for k in plain)
    recorded = load(tmp_path / "chunk3" / "config.toml")
    assert recorded.training.attack_chunk == 3 and load(tmp_path / "micro16" / "config.toml").training.micro_batch == 16


def test_out_of_memory_in_training_is_one_line(tmp_path, classifier_file, monkeypatch) -> None:
    """A (simulated) CUDA out-of-memory gives one line naming the bounds in use, and no traceback."""
    from typer.testing import CliRunner

    from carso_cli.cli import app

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(atk, "pgd", boom)
    result = CliRunner().invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(classifier_file),
            "--out",
            str(tmp_path / "oom"),
            *TINY,
            "--attack-chunk",
            "4",
        ],
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "out of GPU memory" in result.output and "--attack-chunk 4" in result.output
    assert "per-process batch 16" in result.output
    assert not (tmp_path / "oom").exists()  # a failed start leaves nothing


def test_auto_bounds_halve_once_in_purifier_training(tmp_path, classifier_file, monkeypatch) -> None:
    """``--attack-chunk auto`` under a simulated allocator limit of 3 attacked examples: the batch of 16
    attacks 4 with PGD at once, runs out, is retried with the chunk halved to 2, and the run completes."""
    from typer.testing import CliRunner

    from carso_cli.cli import app

    real, calls = atk.pgd, []

    def pgd(model, x, *args, **kwargs):
        calls.append(x.shape[0])
        if x.shape[0] > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(model, x, *args, **kwargs)

    monkeypatch.setattr(atk, "pgd", pgd)
    result = CliRunner().invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(classifier_file),
            "--out",
            str(tmp_path / "auto"),
            *TINY,
            "--attack-chunk",
            "auto",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "'auto' halved to --attack-chunk 2 --micro-batch 8" in " ".join(result.output.split())
    assert calls[0] == 4 and set(calls[1:]) == {2}


def test_bad_bound_values_are_refused(tmp_path, classifier_file) -> None:
    from typer.testing import CliRunner

    from carso_cli.cli import app

    result = CliRunner().invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(classifier_file),
            "--out",
            str(tmp_path / "x"),
            *TINY,
            "--micro-batch",
            "lots",
        ],
    )
    assert result.exit_code != 0 and "--micro-batch" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_info_prints_the_memory_estimate_and_what_fits() -> None:
    from typer.testing import CliRunner

    from carso_cli.cli import app

    result = CliRunner().invoke(app, ["info", "--preset", "smoke", "--gpu-memory", "200MB"])
    assert result.exit_code == 0, result.output
    assert "training step peak" in result.output and "largest --micro-batch within 200MB" in result.output
    auto = CliRunner().invoke(
        app, ["info", "--preset", "smoke", "--set", "training.attack_chunk=auto", "--set", "training.micro_batch=16"]
    )
    assert auto.exit_code == 0, auto.output  # "auto" is chosen at run time: the unbounded attack is estimated
    assert "attacks (8 at once)" in auto.output and "purifier (16 at once)" in auto.output
    bad = CliRunner().invoke(app, ["info", "--preset", "smoke", "--gpu-memory", "lots"])
    assert bad.exit_code != 0 and "cannot read a memory size" in bad.output


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="resets the RSS peak through /proc (Linux)")
def test_per_example_estimates_match_the_cpu_peak_rss(smoke_cfg) -> None:
    """The measured per-example bytes (``memory.measure``) against how far a fresh process's RSS peak
    rises when it runs each phase on 512 examples (``tests/memory_probe.py``). The estimate counts what
    autograd saves; the backward's transient gradients come on top (relatively more for the shallow smoke
    classifier than for WideResNet-28-10), so the RSS may exceed it — within the stated band. Weights
    counted as activations (a single-size probe) put the purifier's estimate at 1.6× the RSS, outside it."""
    fp = memory.measure(smoke_cfg)
    per = {"attack": fp.per_example.attack, "purifier": fp.per_example.representation + fp.per_example.purifier}
    n = 512
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("memory_probe.py")), str(n)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    if "skip" in growth:
        pytest.skip(growth["skip"])
    for phase, bytes_per_example in per.items():
        ratio = growth[phase] / (n * bytes_per_example)
        assert 0.75 <= ratio <= 1.6, (phase, ratio, memory.format_bytes(growth[phase]))


def test_cpu_peak_is_this_programs_and_resets() -> None:
    """``peak_bytes`` on the CPU: at least the current RSS, raised by a large allocation, lowered by
    ``reset_peak`` once it is freed (Linux; elsewhere the peak cannot be reset)."""
    cpu = torch.device("cpu")
    if not memory.reset_peak(cpu):
        pytest.skip("the RSS peak cannot be reset here")
    assert memory.peak_bytes(cpu) >= memory.current_rss() > 0
    before = memory.peak_bytes(cpu)
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert memory.peak_bytes(cpu) >= before + 60 * 2**20
    del big
    assert memory.reset_peak(cpu) and memory.peak_bytes(cpu) < before + 60 * 2**20


def test_split_and_pieces_agree_across_ranks() -> None:
    from carso_cli.training.bounds import pieces

    assert memory.split(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert memory.split(10, None) == [slice(0, 10)] and memory.split(3, 8) == [slice(0, 3)]
    # A global batch of 15 over 2 ranks (8 + 7 rows), bound 7: both cut 2 pieces, none above 7 rows.
    parts = pieces(15, 2, 7)
    assert parts == 2 and pieces(15, 2, None) is None and pieces(16, 2, 8) == 1
    for rows in (8, 7):
        cut = memory.split(rows, 7, parts)
        assert len(cut) == 2 and max(s.stop - s.start for s in cut) <= 7
        assert [i for s in cut for i in range(s.start, s.stop)] == list(range(rows))
