"""``carso train-classifier``: PGD adversarial / standard training, resume, and its weights feeding
``train-purifier``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from carso_cli import checkpoint as ckpt
from carso_cli import distributed
from carso_cli import training as tr
from carso_cli.cli import app
from carso_cli.commands import train_classifier as tc
from carso_cli.config import load_config, parse_override
from carso_cli.models import load_classifier

runner = CliRunner()
CPU = torch.device("cpu")
# 64 examples in batches of 16, 1-step PGD, a 100-image test set: a few seconds.
TINY = [
    "data.synthetic_train_size=64",
    "data.synthetic_test_size=100",
    "classifier_training.batch_size=16",
    "classifier_training.epochs=2",
    "classifier_training.pgd_steps=1",
]


def tiny_cfg(*extra: str):
    return load_config("smoke", dict(parse_override(s) for s in (*TINY, *extra)))


def test_cli_trains_and_prints_the_weights(tmp_path: Path) -> None:
    out = tmp_path / "cls" / "pgd.safetensors"
    args = ["train-classifier", "--preset", "smoke", "--out", str(out), "--device", "cpu"]
    result = runner.invoke(app, [*args, *[a for s in TINY for a in ("--set", s)]])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == str(out)  # the last line is the path, for scripts
    assert "clean test accuracy:" in result.output
    meta = ckpt.read_metadata(out)
    assert meta["format"] == "carso-classifier" and meta["adversarial"] == "pgd" and meta["epochs"] == "2"
    model = load_classifier(load_config("smoke"), out)  # what train-purifier --classifier does
    assert not model.training
    for what in ("state.safetensors", "config.toml", "metrics.jsonl", "curves.png"):
        assert tc.companion(out, what).is_file(), what
    records = tr.read_metrics(tc.companion(out, "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [0, 1] and all(0 <= r["accuracy"] <= 1 for r in records)

    again = runner.invoke(app, [*args, *[a for s in TINY for a in ("--set", s)]])
    assert again.exit_code == 1 and "already exists" in again.output


def test_standard_training_learns(tmp_path: Path) -> None:
    """Clean training on the synthetic data gets above chance (10 classes) within 20 steps."""
    cfg = tiny_cfg("data.synthetic_train_size=320", "classifier_training.batch_size=32", "classifier_training.epochs=2")
    cfg.classifier_training.adversarial = "none"
    result = tc.run(cfg, tmp_path / "clean.safetensors", device=CPU)
    assert ckpt.read_metadata(result.weights)["adversarial"] == "none"
    assert result.records[-1]["accuracy"] > result.records[0]["accuracy"]
    assert result.clean_accuracy > 0.2  # 0.29 after these 20 steps; chance is 0.1


def test_precise_bn_averages_the_training_inputs() -> None:
    """After ``recalibrate_bn`` the running statistics are the exact averages over ~1k inputs."""
    torch.manual_seed(0)
    x = torch.randn(200, 3, 4, 4) * 2 + 1
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(200, dtype=torch.long))
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=0.01))
    spec = tr.LoopSpec(ctx=distributed.DistContext(), dataset=dataset, global_batch=50, epochs=1, seed=0, sums=["n"])
    tc.recalibrate_bn(model, spec, lambda b: b.x, epoch=0)
    bn = model[0]
    assert bn.momentum == 0.01  # restored
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    per_batch_var = torch.stack([x[b].var(dim=(0, 2, 3)) for b in tr.epoch_batches(200, 50, 0, 0)]).mean(0)
    assert torch.allclose(bn.running_var, per_batch_var, atol=1e-4)


def test_resume_after_sigterm_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With augmentation on (the paper presets'): a resumed epoch augments as an uninterrupted one.
    def cfg():
        return tiny_cfg("data.synthetic_train_size=48", "data.augment=true")

    whole = tc.run(cfg(), tmp_path / "whole.safetensors", device=CPU, evaluate=False)

    real = tr.loop._all_reduce
    calls = {"n": 0}

    def reduce(values, ctx):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 1, batch 0: seen at batch 1, the checkpoint is at epoch 1, batch 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real(values, ctx)

    monkeypatch.setattr(tr.loop, "_all_reduce", reduce)  # where run_loop looks it up
    out = tmp_path / "cut.safetensors"
    with pytest.raises(tr.TrainingInterrupted, match="SIGTERM at epoch 1, batch 2"):
        tc.run(cfg(), out, device=CPU, evaluate=False)
    assert not out.exists() and tc.companion(out, "state.safetensors").is_file()
    monkeypatch.undo()

    # The command a user would have typed for this run, with --resume added.
    argv = [
        "train-classifier",
        "--preset",
        "smoke",
        "--out",
        str(out),
        "--device",
        "cpu",
        *[a for s in (*TINY, "data.synthetic_train_size=48", "data.augment=true") for a in ("--set", s)],
        "--resume",
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "resumed from epoch 1, batch 2" in result.output
    a, _ = ckpt.load_tensors(whole.weights)
    b, _ = ckpt.load_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_gloo_equal_one_process(tmp_path: Path) -> None:
    """PGD adversarial training with ``--gpus 2 --device cpu``: the attack runs the train-mode model, so
    its BatchNorm statistics are synchronised across ranks too; the weights equal one process's."""
    sets = [
        *TINY,
        "data.synthetic_train_size=32",
        "data.synthetic_test_size=50",
        "classifier_training.epochs=1",
        "data.augment=true",
    ]  # augmentation is keyed by example, so both processes augment as one does
    one = tc.run(tiny_cfg(*sets[len(TINY) :]), tmp_path / "one.safetensors", device=CPU, evaluate=False).weights
    cmd = [
        sys.executable,
        "-m",
        "carso_cli",
        "train-classifier",
        "--gpus",
        "2",
        "--device",
        "cpu",
        "--preset",
        "smoke",
        "--out",
        str(tmp_path / "two.safetensors"),
        *[a for s in sets for a in ("--set", s)],
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(tmp_path / "two.safetensors")
    a, _ = ckpt.load_tensors(one)
    b, _ = ckpt.load_tensors(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-5), k


def test_cli_errors(tmp_path: Path) -> None:
    cases = [
        (
            ["train-classifier", "--preset", "smoke", "--out", str(tmp_path / "x.pt"), "--device", "cpu"],
            "must name a .safetensors",
        ),
        (["train-classifier", "--resume", "--device", "cpu"], "--resume needs --out"),
        (
            ["train-classifier", "--resume", "--out", str(tmp_path / "none.safetensors"), "--device", "cpu"],
            "cannot resume",
        ),
        (["train-classifier", "--device", "cpu"], "--preset is required"),
        (["train-classifier", "--preset", "smoke", "--adversarial", "fgsm"], "fgsm"),
    ]
    for args, text in cases:
        result = runner.invoke(app, args)
        assert result.exit_code != 0, (args, result.output)
        assert text in result.output, result.output
        assert "Traceback" not in result.output


def test_failed_start_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 7.2: unreadable data fails before anything is written; a start failing in the loop removes
    the companions it wrote (and the folder it made), never another file of that folder."""
    from carso_cli import data
    from carso_cli.errors import DataError

    real = data.build_dataset

    def offline(*args, **kwargs):
        raise DataError("offline")

    monkeypatch.setattr(data, "build_dataset", offline)

    def args(out, *extra):
        return [
            "train-classifier",
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--device",
            "cpu",
            *[a for s in TINY for a in ("--set", s)],
            *extra,
        ]

    result = runner.invoke(app, args(tmp_path / "new" / "c.safetensors"))
    assert result.exit_code == 1 and "offline" in result.output
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(data, "build_dataset", real)
    result = runner.invoke(app, args(tmp_path / "new" / "c.safetensors", "--set", "classifier_training.batch_size=128"))
    assert result.exit_code == 1 and "fewer than one batch" in result.output, result.output
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "other.safetensors").write_bytes(b"x")
    result = runner.invoke(app, args(tmp_path / "old" / "c.safetensors", "--set", "classifier_training.batch_size=128"))
    assert result.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == [".c.safetensors.lock", "other.safetensors"]


def test_gpus_without_cuda_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from carso_cli import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "relaunch", lambda n, argv, **_: pytest.fail("must not launch"))
    result = runner.invoke(
        app, ["train-classifier", "--preset", "smoke", "--gpus", "3", "--out", str(tmp_path / "c.safetensors")]
    )
    assert result.exit_code == 1
    assert "--gpus 3: no CUDA device visible; --device cpu runs 3 CPU processes" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Memory bounds (issue 9): --attack-chunk / --micro-batch, out of memory
# --------------------------------------------------------------------------------------------------


def _argv(out: Path, *extra: str) -> list[str]:
    return [
        "train-classifier",
        "--preset",
        "smoke",
        "--out",
        str(out),
        "--device",
        "cpu",
        *[a for s in TINY for a in ("--set", s)],
        *extra,
    ]


def test_micro_batch_of_the_whole_batch_is_the_plain_run(tmp_path: Path) -> None:
    plain, bounded, chunked = tmp_path / "plain.safetensors", tmp_path / "m16.safetensors", tmp_path / "c5.safetensors"
    for out, extra in (
        (plain, ()),
        (bounded, ("--micro-batch", "16", "--attack-chunk", "16")),
        (chunked, ("--micro-batch", "5", "--attack-chunk", "6")),
    ):
        result = runner.invoke(app, _argv(out, *extra))
        assert result.exit_code == 0, result.output
    a, _ = ckpt.load_tensors(plain)
    b, _ = ckpt.load_tensors(bounded)
    c, _ = ckpt.load_tensors(chunked)
    assert all(torch.equal(a[k], b[k]) for k in a)  # one piece each: bitwise the run without bounds
    # Smaller pieces: ghost batch norm (train-mode BatchNorm over 6- and 5-example pieces) — another run.
    assert any(not torch.equal(a[k], c[k]) for k in a) and all(torch.isfinite(c[k]).all() for k in c)
    recorded = load_config(tc.companion(chunked, "config.toml")).classifier_training
    assert (recorded.micro_batch, recorded.attack_chunk) == (5, 6)


def _limited_pgd(limit: int, calls: list[int]):
    """attacks.pgd under a simulated allocator limit: more than ``limit`` examples at once run out of memory."""
    from carso_cli import attacks

    real = attacks.pgd

    def pgd(model, x, *args, **kwargs):
        calls.append(x.shape[0])
        if x.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} examples")
        return real(model, x, *args, **kwargs)

    return pgd


def test_auto_bounds_halve_once_on_out_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from carso_cli import attacks

    calls: list[int] = []
    monkeypatch.setattr(attacks, "pgd", _limited_pgd(8, calls))
    out = tmp_path / "auto.safetensors"
    result = runner.invoke(app, _argv(out, "--attack-chunk", "auto"))
    assert result.exit_code == 0, result.output
    assert "'auto' halved to --attack-chunk 8 --micro-batch 8, retrying the batch once" in " ".join(
        result.output.split()
    )
    assert calls[:3] == [16, 8, 8] and set(calls[3:]) == {8}  # the halved bound stays for the later batches
    assert load_config(tc.companion(out, "config.toml")).classifier_training.attack_chunk == "auto"

    # Still out of memory after halving, or an explicit bound: one line, nothing left behind.
    monkeypatch.setattr(attacks, "pgd", _limited_pgd(4, []))
    for extra in (("--attack-chunk", "auto"), ("--attack-chunk", "12")):
        failed = tmp_path / f"oom-{extra[1]}.safetensors"
        result = runner.invoke(app, _argv(failed, *extra))
        text = " ".join(result.output.split())
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert "out of GPU memory" in text and "per-process batch 16" in text
        assert f"--attack-chunk {8 if extra[1] == 'auto' else 12}" in text
        assert not list(tmp_path.glob(f"oom-{extra[1]}*"))  # a failed start leaves nothing


@pytest.mark.slow
def test_two_processes_with_unequal_shards_cut_as_many_pieces(tmp_path: Path) -> None:
    """Global batch 15 over 2 processes (8 + 7 rows) with bounds of 7: rank 0 alone would cut 2 pieces and
    rank 1 one, and the synchronised BatchNorm of rank 0's second piece would wait forever; both cut 2."""
    sets = [*TINY, "data.synthetic_train_size=30", "classifier_training.batch_size=15", "classifier_training.epochs=1"]
    cmd = [
        sys.executable,
        "-m",
        "carso_cli",
        "train-classifier",
        "--gpus",
        "2",
        "--device",
        "cpu",
        "--preset",
        "smoke",
        "--out",
        str(tmp_path / "two.safetensors"),
        *[a for s in sets for a in ("--set", s)],
        "--attack-chunk",
        "7",
        "--micro-batch",
        "7",
    ]
    # Its own session, so a hang (the fault this guards against) kills torchrun's workers too.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the two processes hung: ranks cut their rows into different numbers of pieces")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert ckpt.load_tensors(tmp_path / "two.safetensors")[0]
