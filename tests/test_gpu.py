"""CUDA paths (issue 9): bf16 autocast, channels_last, SyncBatchNorm and NCCL, chunking on the GPU.

Every test here is ``gpu``-marked and skipped without CUDA (CI has none): run ``pytest -m gpu`` on a GPU
machine (benchmarks/gpu_session.sh does, before the benchmarks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from carso_cli import attacks as atk
from carso_cli import checkpoint as ckpt
from carso_cli.cli import app
from carso_cli.config import load_config
from carso_cli.models import build_classifier, load_run

pytestmark = pytest.mark.gpu
runner = CliRunner()
TINY = [
    "--set",
    "data.synthetic_train_size=64",
    "--set",
    "training.batch_size=32",
    "--set",
    "training.epochs=1",
    "--set",
    "attacks.pgd_steps=2",
]


def _train(tmp_path: Path, classifier_file: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(classifier_file),
            "--out",
            str(out),
            "--device",
            "cuda",
            *TINY,
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_bf16_channels_last_training_is_finite(tmp_path: Path, classifier_file: Path) -> None:
    run = _train(tmp_path, classifier_file, "bf16", "--bf16")
    metrics = [json.loads(line) for line in (run / ckpt.METRICS_FILE).read_text().splitlines()]
    assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    _cfg, classifier, purifier = load_run(run, device="cuda")
    assert all(torch.isfinite(p).all() for p in purifier.parameters())


def test_attack_chunk_and_micro_batch_run_on_cuda(tmp_path: Path, classifier_file: Path) -> None:
    a = _train(tmp_path, classifier_file, "whole", "--no-bf16")
    b = _train(tmp_path, classifier_file, "chunked", "--no-bf16", "--attack-chunk", "4", "--micro-batch", "32")
    ta, _ = ckpt.load_tensors(a / ckpt.PURIFIER_FILE)
    tb, _ = ckpt.load_tensors(b / ckpt.PURIFIER_FILE)
    # cuDNN may pick other kernels for other batch shapes: equal up to float rounding.
    for k in ta:
        assert torch.allclose(ta[k].float(), tb[k].float(), atol=1e-4, rtol=1e-3), k


def test_inductor_compiled_training_runs_and_stays_close(tmp_path: Path, classifier_file: Path) -> None:
    """``--compile inductor`` on CUDA: compiles (no fallback line), and the purifier is the eager one up to
    the rounding of fused kernels (float32, one epoch)."""
    out = tmp_path / "compiled"
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(classifier_file),
            "--out",
            str(out),
            "--device",
            "cuda",
            *TINY,
            "--no-bf16",
            "--compile",
            "inductor",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "continuing without it" not in result.output
    eager = _train(tmp_path, classifier_file, "eager", "--no-bf16")
    ta, _ = ckpt.load_tensors(eager / ckpt.PURIFIER_FILE)
    tb, _ = ckpt.load_tensors(out / ckpt.PURIFIER_FILE)
    for k in ta:
        assert torch.allclose(ta[k].float(), tb[k].float(), atol=1e-3, rtol=1e-2), k


def test_chunked_pgd_on_cuda_equals_unchunked() -> None:
    torch.manual_seed(0)
    model = build_classifier(load_config("smoke")).cuda().eval()
    x = torch.rand(64, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    noise = torch.rand_like(x)
    whole = atk.pgd(model, x, y, 8 / 255, 3, 0.01, start_noise=noise)
    parts = atk.in_chunks(atk.pgd, 16, model, x, y, 8 / 255, 3, 0.01, start_noise=noise)
    assert (whole - parts).abs().max() <= 1e-5


def test_auto_attack_chunk_fits_and_trains(tmp_path: Path, classifier_file: Path) -> None:
    _train(tmp_path, classifier_file, "auto", "--attack-chunk", "auto", "--micro-batch", "auto")


def test_nccl_one_gpu_and_syncbatchnorm(tmp_path: Path, classifier_file: Path) -> None:
    """``--gpus 1`` under torchrun uses NCCL and converts BatchNorm to SyncBatchNorm on one process."""
    out = tmp_path / "nccl"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "-m",
        "carso_cli",
        "train-purifier",
        "--preset",
        "smoke",
        "--classifier",
        str(classifier_file),
        "--out",
        str(out),
        "--device",
        "cuda",
        *TINY,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / ckpt.PURIFIER_FILE).is_file()


def test_bench_reports_peak_memory_on_cuda() -> None:
    result = runner.invoke(
        app,
        [
            "bench",
            "attack",
            "--preset",
            "smoke",
            "--batch-size",
            "8",
            "--batches",
            "2",
            "--device",
            "cuda",
            "--json",
            "--bf16",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["peak_memory_bytes"] > 0
