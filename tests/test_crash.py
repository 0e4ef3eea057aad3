"""Crash consistency (issue 14): a training or an evaluation killed with SIGKILL — between steps, or
while a checkpoint is being written — and resumed with the command first typed plus ``--resume`` ends
bitwise where an uninterrupted run ends, and every file left in the run directory loads. A write that
fails midway (disk full, read-only directory) leaves the last checkpoint usable, no partial file, and
one line saying so."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from carso_cli import checkpoint as ckpt
from carso_cli import training as tr
from carso_cli.cli import app
from carso_cli.commands import train_classifier as tc
from carso_cli.commands import train_purifier as tp
from carso_cli.config import load_config

runner = CliRunner()
DRIVER = Path(__file__).with_name("fault_driver.py")
REPO = Path(__file__).resolve().parent.parent
# 32 examples in batches of 16: 2 steps an epoch, 2 epochs, a checkpoint after each epoch.
PURIFIER = [
    "data.synthetic_train_size=32",
    "training.batch_size=16",
    "training.epochs=2",
    "training.lookahead_k=2",
    "attacks.pgd_steps=1",
]
CLASSIFIER = [
    "data.synthetic_train_size=32",
    "data.synthetic_test_size=20",
    "classifier_training.batch_size=16",
    "classifier_training.epochs=2",
    "classifier_training.pgd_steps=1",
]


def sets(overrides):
    return [a for s in overrides for a in ("--set", s)]


def run_with_fault(fault: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(
        [sys.executable, str(DRIVER), fault, *argv],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def check_loads(path: Path, ignore: list[Path] = ()) -> None:  # type: ignore[assignment]
    """Every file carso leaves in a run directory is whole: it loads by its kind."""
    for p in sorted(q for q in path.rglob("*") if q.is_file() and q not in ignore):
        name = p.name
        if name.endswith(".safetensors"):
            ckpt.load_tensors(p)
        elif name.endswith(".jsonl"):
            tr.read_metrics(p)
        elif name.endswith((".json", ".lock")):
            json.loads(p.read_text() or "{}")
        elif name.endswith(".toml"):
            load_config(p)
        elif name.endswith(".png"):
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
        elif name.endswith(".log"):  # AutoAttack's log (text, appended as the library writes)
            p.read_text()
        else:
            raise AssertionError(f"unexpected file {p}")


def same_tensors(a: Path, b: Path, skip: str = "rng.") -> None:
    x, _ = ckpt.load_tensors(a)
    y, _ = ckpt.load_tensors(b)
    assert x.keys() == y.keys()
    for k in x:
        if not k.startswith(skip):
            assert torch.equal(x[k], y[k]), (a.name, k)


@pytest.fixture(scope="module")
def whole_purifier(classifier_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "whole"
    argv = [
        "train-purifier",
        "--preset",
        "smoke",
        "--classifier",
        str(classifier_file),
        "--out",
        str(out),
        "--device",
        "cpu",
        *sets(PURIFIER),
    ]
    assert runner.invoke(app, argv).exit_code == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill-at-step:3", "kill-in-write:last.safetensors:2"])
def test_purifier_killed_and_resumed(tmp_path: Path, classifier_file: Path, whole_purifier: Path, fault: str) -> None:
    out = tmp_path / "run"
    argv = [
        "train-purifier",
        "--preset",
        "smoke",
        "--classifier",
        str(classifier_file),
        "--out",
        str(out),
        "--device",
        "cpu",
        *sets(PURIFIER),
    ]
    killed = run_with_fault(fault, argv)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert tr.load_training_state(out / tp.CHECKPOINT, "purifier").position == tr.Position(1, 0)
    # Killed in the write: between the complete temporary file and its rename onto the final name.
    temporaries = sorted(out.rglob("*.tmp"))
    assert [p.name.startswith(".last.safetensors.") for p in temporaries] == ([True] if "in-write" in fault else [])
    check_loads(out, ignore=temporaries)

    result = runner.invoke(app, [*argv, "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed from epoch 1, batch 0" in result.output
    assert not list(out.rglob("*.tmp"))
    check_loads(out)
    same_tensors(whole_purifier / tp.CHECKPOINT, out / tp.CHECKPOINT)
    same_tensors(whole_purifier / ckpt.PURIFIER_FILE, out / ckpt.PURIFIER_FILE)


@pytest.mark.slow
def test_classifier_killed_while_writing_and_resumed(tmp_path: Path) -> None:
    whole, out = tmp_path / "whole.safetensors", tmp_path / "cut.safetensors"

    def argv(o):
        return ["train-classifier", "--preset", "smoke", "--out", str(o), "--device", "cpu", *sets(CLASSIFIER)]

    assert runner.invoke(app, argv(whole)).exit_code == 0
    killed = run_with_fault("kill-in-write:cut.state.safetensors:2", argv(out))
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not out.exists()
    assert tr.load_training_state(tc.companion(out, "state.safetensors"), "classifier").position == tr.Position(1, 0)
    assert len(list(tmp_path.glob(".cut.state.safetensors.*.tmp"))) == 1
    result = runner.invoke(app, [*argv(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed from epoch 1, batch 0" in result.output
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    check_loads(tmp_path)
    same_tensors(whole, out)
    same_tensors(tc.companion(whole, "state.safetensors"), tc.companion(out, "state.safetensors"))


@pytest.mark.slow
def test_evaluation_killed_while_writing_and_resumed(tiny_run: Path) -> None:
    args = [
        "eval",
        "--run",
        str(tiny_run),
        "--attack",
        "pgd-eot",
        "--n-examples",
        "6",
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
    assert runner.invoke(app, [*args, "--name", "whole"]).exit_code == 0
    killed = run_with_fault("kill-in-write:batch-*.json:2", [*args, "--name", "cut"])
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    folder = tiny_run / "eval" / "cut"
    assert [p.name for p in sorted(folder.glob("batch-*.json"))] == ["batch-00000.json"]
    result = runner.invoke(app, [*args, "--name", "cut", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed: 1 batch(es) found on disk, 2 computed" in result.output
    check_loads(folder)
    whole, cut = (json.loads((tiny_run / "eval" / n / "results.json").read_text()) for n in ("whole", "cut"))
    assert cut["flags"] == whole["flags"] and cut["metrics"] == whole["metrics"]


# ----------------------------------------------------------------------------------------------------
# A write that fails midway
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, what", [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system")]
)
def test_disk_full_while_writing_a_checkpoint(
    tmp_path: Path, classifier_file: Path, whole_purifier: Path, monkeypatch: pytest.MonkeyPatch, code: int, what: str
) -> None:
    out = tmp_path / "run"
    argv = [
        "train-purifier",
        "--preset",
        "smoke",
        "--classifier",
        str(classifier_file),
        "--out",
        str(out),
        "--device",
        "cpu",
        *sets(PURIFIER),
    ]
    real, writes = ckpt.save_file, [0]

    def save_file(tensors, filename, metadata=None):
        if ".last.safetensors." in Path(filename).name:
            writes[0] += 1
            if writes[0] == 2:  # the disk fills up halfway through the second checkpoint
                Path(filename).write_bytes(b"\0" * 100)
                raise OSError(code, os.strerror(code))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    result = runner.invoke(app, argv)
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert f"error: {what} while writing {out / tp.CHECKPOINT} (" in line, result.output  # (its size)
    assert "; the last checkpoint, epoch 1, is intact; free space and rerun with --resume" in line, result.output
    assert "Traceback" not in result.output
    assert not list(out.rglob("*.tmp")) and not (out / ckpt.PURIFIER_FILE).exists()
    check_loads(out)
    monkeypatch.undo()
    result = runner.invoke(app, [*argv, "--resume"])
    assert result.exit_code == 0, result.output
    same_tensors(whole_purifier / ckpt.PURIFIER_FILE, out / ckpt.PURIFIER_FILE)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories: chmod cannot simulate it")
def test_read_only_run_directory(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    ckpt.atomic_write_text(folder / "a.txt", "old")
    folder.chmod(0o555)
    try:
        with pytest.raises(ckpt.DiskWriteError, match="permission denied while writing"):
            ckpt.atomic_write_text(folder / "a.txt", "new")
        assert (folder / "a.txt").read_text() == "old" and sorted(p.name for p in folder.iterdir()) == ["a.txt"]
    finally:
        folder.chmod(0o755)


# ----------------------------------------------------------------------------------------------------
# A real full disk (issue 22.1): a tmpfs mounted by the test; safetensors' own SafetensorError included
# ----------------------------------------------------------------------------------------------------


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A ``size`` tmpfs mounted on ``folder`` (root only), unmounted whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (a real full disk) needs root")
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def temporaries(folder: Path) -> list[Path]:
    """Temporary files of carso (``.NAME.*.tmp``) or of safetensors' own writer (``.tmpXXXXXX``)."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


def test_real_full_disk_keeps_the_last_checkpoint(tmp_path: Path, classifier_file: Path, whole_purifier: Path) -> None:
    """9 MB: the classifier copy and epoch 1's checkpoint (5.6 MB) fit, epoch 2's does not (the old one
    stays until the new one is complete). After the disk grows, --resume ends where a whole run ends."""
    with tmpfs(tmp_path / "disk", "9m") as disk:
        out = disk / "run"
        argv = [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(classifier_file),
            "--out",
            str(out),
            "--device",
            "cpu",
            *sets(PURIFIER),
        ]
        full = run_with_fault("none", argv)
        assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
        line = " ".join(full.stderr.split())
        assert line.startswith(f"error: no space left on device while writing {out / tp.CHECKPOINT} ("), line
        assert line.endswith("; the last checkpoint, epoch 1, is intact; free space and rerun with --resume"), line
        assert "Traceback" not in full.stderr and "internal error" not in full.stderr
        assert not temporaries(disk) and not (out / ckpt.PURIFIER_FILE).exists()
        assert tr.load_training_state(out / tp.CHECKPOINT, "purifier").position == tr.Position(1, 0)
        check_loads(out)

        subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True)
        resumed = run_with_fault("none", [*argv, "--resume"])
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        assert "resumed from epoch 1, batch 0" in resumed.stdout
        assert not temporaries(disk)
        check_loads(out)
        same_tensors(whole_purifier / ckpt.PURIFIER_FILE, out / ckpt.PURIFIER_FILE)


def test_real_full_disk_at_the_first_checkpoint(tmp_path: Path, classifier_file: Path) -> None:
    """4 MB: the first checkpoint does not fit. Nothing is resumable, so the run is removed (giving the
    space back), and the message says the training so far is lost, how long it took (from 1 s on) and
    what went."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        out = disk / "run"
        full = run_with_fault(
            "none",
            [
                "train-purifier",
                "--preset",
                "smoke",
                "--classifier",
                str(classifier_file),
                "--out",
                str(out),
                "--device",
                "cpu",
                *sets(PURIFIER),
            ],
        )
        assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
        line = " ".join(full.stderr.split())
        assert line.startswith(f"error: no space left on device while writing {out / tp.CHECKPOINT} ("), line
        assert "; no checkpoint was written yet, so the training so far is lost; free space and start again" in line
        # how long the lost work took is said from 1 s of it on (a fast machine may fail sooner)
        tail = re.escape(f"with no checkpoint to resume from, {out} was removed)")
        assert re.search(r"\((after \d+(\.\d)? (s|min|h) of work: )?" + tail + "$", line), line
        assert "Traceback" not in full.stderr
        assert list(disk.iterdir()) == []


def test_real_full_disk_saving_adversarial_examples(tiny_run: Path, tmp_path: Path) -> None:
    """Another safetensors writer: ``eval --save-adversarial`` onto a full disk. One line; the evaluation's
    own results (on another disk) are complete; nothing partial on the full one."""
    with tmpfs(tmp_path / "disk", "16k") as disk:
        target = disk / "adv.safetensors"
        full = run_with_fault(
            "none",
            [
                "eval",
                "--run",
                str(tiny_run),
                "--attack",
                "pgd-eot",
                "--n-examples",
                "2",
                "--batch-size",
                "2",
                "--samples",
                "2",
                "--steps",
                "1",
                "--eot",
                "1",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--save-adversarial",
                str(target),
            ],
        )
        assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
        line = " ".join(full.stderr.split())
        assert line.startswith(f"error: no space left on device while writing {target} ("), line
        assert "Traceback" not in full.stderr and list(disk.iterdir()) == []
        check_loads(tiny_run / "eval" / "pgd-eot")


# ----------------------------------------------------------------------------------------------------
# A rank dies (issue 22.2): two gloo processes, one of them killed with a real SIGKILL mid-epoch
# ----------------------------------------------------------------------------------------------------


def worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's descendant with ``RANK=rank`` in its environment (a /proc scan)."""
    parents, ranks = {}, {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                ranks[int(proc.name)] = True
        except (OSError, IndexError, ValueError):
            continue
    for pid in ranks:
        ancestor = parents.get(pid)
        while ancestor not in (None, 0, 1, launcher):
            ancestor = parents.get(ancestor)
        if ancestor == launcher:
            return pid
    return None


@pytest.mark.slow
def test_a_rank_killed_mid_epoch(tmp_path: Path, classifier_file: Path) -> None:
    """One line: which rank died and how, the last intact checkpoint, the command that continues — which
    then finishes the run. Not rank 0's traceback, nor torchrun's report."""
    out = tmp_path / "run"
    # 64 examples in batches of 16: 4 steps an epoch, 3 epochs.
    argv = [
        "train-purifier",
        "--gpus",
        "2",
        "--device",
        "cpu",
        "--preset",
        "smoke",
        "--classifier",
        str(classifier_file),
        "--out",
        str(out),
        *sets(
            [
                "data.synthetic_train_size=64",
                "training.batch_size=16",
                "training.epochs=3",
                "training.lookahead_k=2",
                "attacks.pgd_steps=1",
            ]
        ),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(
        [sys.executable, "-m", "carso_cli", *argv],
        env=env,
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / tp.CHECKPOINT).exists():  # epoch 0 is done: rank 1 is into epoch 1
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        pid = worker_pid(job.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1, stdout[-2000:] + stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    said = re.fullmatch(
        rf"error: rank 1 \(pid {pid}\) was killed by SIGKILL, without an error of its own; the other "
        r"ranks were stopped; the last checkpoint, epoch (\d+), is intact \((.+)\); continue with: "
        r"(carso train-purifier .* --resume)",
        lines[0],
    )
    assert said is not None, lines[0]
    assert said.group(2) == str(out / tp.CHECKPOINT)
    epoch = int(said.group(1))
    assert tr.load_training_state(out / tp.CHECKPOINT, "purifier").position == tr.Position(epoch, 0)
    assert not temporaries(out)
    check_loads(out)

    again = shlex.split(said.group(3))
    resumed = subprocess.run(
        [sys.executable, "-m", "carso_cli", *again[1:]],
        env=env,
        cwd=tmp_path,
        text=True,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from epoch {epoch}, batch 0" in resumed.stdout
    assert [r["epoch"] for r in tr.read_metrics(out / ckpt.METRICS_FILE)] == [0, 1, 2]
    check_loads(out)
