"""One writer per run directory (issue 14): the lock itself, and two trainings / two evaluations
started into one place while the first holds it — one success, one refusal that changed nothing, and
the success equal to a run started alone. The other process is a real one (``fault_driver.py``),
caught in the middle of its run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from carso_cli import checkpoint as ckpt
from carso_cli import locking
from carso_cli.cli import app
from carso_cli.config import load_config
from carso_cli.models import build_classifier

runner = CliRunner()
DRIVER = Path(__file__).with_name("fault_driver.py")
REPO = Path(__file__).resolve().parent.parent
TINY = ["data.synthetic_train_size=32", "training.batch_size=16", "training.epochs=2", "attacks.pgd_steps=1"]


def spawn(*args: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }  # bitwise equal to in-process runs
    return subprocess.Popen(
        [sys.executable, str(DRIVER), *args],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the first process ended early: {proc.stdout.read()[-3000:]}")  # type: ignore[union-attr]
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the first process never reached the pause")
        time.sleep(0.05)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def test_lock_names_holder_and_dies_with_it(tmp_path: Path) -> None:
    code = (
        "import sys, time; from carso_cli import locking\n"
        "with locking.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # type: ignore[union-attr]
        with pytest.raises(locking.LockedError) as refused, locking.hold(tmp_path):
            pass
        text = str(refused.value)
        assert str(tmp_path) in text and f"pid {holder.pid}" in text and socket.gethostname() in text
        assert "wait for it, or use another --out" in text
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The OS released the lock of the killed holder: no stale lock.
    with locking.hold(tmp_path), locking.hold(tmp_path):  # and re-entrant within one process
        pass


@pytest.mark.slow
def test_two_trainings_into_one_out(tmp_path: Path) -> None:
    classifier = tmp_path / "c.safetensors"
    torch.manual_seed(0)
    ckpt.save_tensors(classifier, build_classifier(load_config("smoke")).state_dict())

    def argv(out):
        return [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(classifier),
            "--out",
            str(out),
            "--device",
            "cpu",
            *[a for s in TINY for a in ("--set", s)],
        ]

    out, pause = tmp_path / "run", tmp_path / "pause"
    pause.mkdir()
    first = spawn(f"pause-in-write:last.safetensors:1:{pause}", *argv(out))  # caught writing its first checkpoint
    try:
        wait_for(pause / "ready", first)
        before = snapshot(out)
        second = runner.invoke(app, argv(out))
        assert second.exit_code == 1, second.output
        line = " ".join(second.output.split())
        assert f"{out} is in use by another carso process (pid {first.pid} on host {socket.gethostname()})" in line
        assert "wait for it, or use another --out" in line
        assert snapshot(out) == before  # refused before it changed anything
        # Read-only commands keep working while the run trains.
        assert runner.invoke(app, ["plot", str(out)]).exit_code == 0
    finally:
        (pause / "go").touch()
        output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output[-3000:]
    later = runner.invoke(app, argv(out))  # started after the first ended: refused too
    assert later.exit_code == 1 and "already holds a training run" in later.output

    # Two plain processes started 1 s apart, no fault injected: whichever reaches the lock first wins.
    raced = tmp_path / "raced"
    pair = [spawn("none", *argv(raced))]
    time.sleep(1)
    pair.append(spawn("none", *argv(raced)))
    outputs = [p.communicate(timeout=300)[0] for p in pair]
    assert sorted(p.returncode for p in pair) == [0, 1], outputs
    refusal = " ".join(outputs[[p.returncode for p in pair].index(1)].split())
    assert "is in use by another carso process" in refusal or "already holds a training run" in refusal, refusal

    alone = runner.invoke(app, argv(tmp_path / "alone"))
    assert alone.exit_code == 0, alone.output
    b, _ = ckpt.load_tensors(tmp_path / "alone" / ckpt.PURIFIER_FILE)
    for run in (out, raced):
        a, _ = ckpt.load_tensors(run / ckpt.PURIFIER_FILE)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run


@pytest.mark.slow
def test_two_evaluations_with_one_name(tiny_run: Path) -> None:
    args = [
        "eval",
        "--run",
        str(tiny_run),
        "--attack",
        "pgd-eot",
        "--n-examples",
        "4",
        "--batch-size",
        "2",
        "--samples",
        "2",
        "--steps",
        "2",
        "--eot",
        "1",
        "--repeats",
        "2",
        "--device",
        "cpu",
    ]
    pause = tiny_run.parent / "pause"
    pause.mkdir()
    first = spawn(f"pause-in-write:batch-*.json:1:{pause}", *args, "--name", "n")
    try:
        wait_for(pause / "ready", first)
        before = snapshot(tiny_run)
        second = runner.invoke(app, [*args, "--name", "n"])
        assert second.exit_code == 1, second.output
        line = " ".join(second.output.split())
        assert f"eval/n is in use by another carso process (pid {first.pid}" in line
        assert "wait for it, or use another --name" in line
        assert snapshot(tiny_run) == before
    finally:
        (pause / "go").touch()
        output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output[-3000:]
    assert runner.invoke(app, [*args, "--name", "alone"]).exit_code == 0
    shared, alone = (json.loads((tiny_run / "eval" / n / "results.json").read_text()) for n in ("n", "alone"))
    assert shared["flags"] == alone["flags"] and shared["metrics"] == alone["metrics"]
