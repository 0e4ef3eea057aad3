"""``carso train-purifier`` (and ``carso plot``): a real smoke training, resume equality, interruption,
non-finite loss, the 2-process gloo equivalence, and the CLI's errors."""

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
from carso_cli import training as tr
from carso_cli.cli import app
from carso_cli.commands import train_purifier
from carso_cli.config import load_config, parse_override
from carso_cli.errors import TrainingError
from carso_cli.models import build_classifier, load_run

runner = CliRunner()
CPU = torch.device("cpu")

# A tiny training: 48 examples in batches of 16 (3 steps an epoch), 2-step PGD, Lookahead k = 2 so that
# slow-weight updates happen within a few steps.
TINY = [
    "data.synthetic_train_size=48",
    "training.batch_size=16",
    "training.epochs=2",
    "training.lookahead_k=2",
    "attacks.pgd_steps=2",
]


def tiny_cfg(*extra: str):
    return load_config("smoke", dict(parse_override(s) for s in (*TINY, *extra)))


def state_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = ckpt.load_tensors(run / train_purifier.CHECKPOINT)
    return {k: v for k, v in tensors.items() if not k.startswith("rng.")}


def interrupt_at_reduce(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Send this process SIGTERM during the ``call``-th step (counting from 1), as a user or scheduler would."""
    real = tr.loop._all_reduce
    calls = {"n": 0}

    def reduce(values, ctx):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(values, ctx)

    monkeypatch.setattr(tr.loop, "_all_reduce", reduce)  # where run_loop looks it up


def cli_args(classifier: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for s in TINY for a in ("--set", s)]
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
        *sets,
        *extra,
    ]


# --------------------------------------------------------------------------------------------------


def test_smoke_training_reconstruction_loss_falls(trained_smoke_run: Path) -> None:
    run = trained_smoke_run
    records = tr.read_metrics(run / ckpt.METRICS_FILE)
    cfg = load_config(run / ckpt.CONFIG_FILE)
    assert [r["epoch"] for r in records] == list(range(cfg.training.epochs))
    bce = [r["bce"] for r in records]
    assert bce[-1] < bce[1] < bce[0]  # the reconstruction loss falls
    assert [r["lr"] for r in records] == pytest.approx([tr.lr_at_epoch(cfg.training, e) for e in range(6)])
    assert [r["beta"] for r in records] == [tr.beta_at_epoch(cfg.training, e) for e in range(6)]
    assert (run / train_purifier.CURVES_FILE).stat().st_size > 1000
    # The inference bundle drops the input and joint encoders; the training checkpoint keeps them.
    bundle, meta = ckpt.load_tensors(run / ckpt.PURIFIER_FILE)
    assert meta["parts"] == "inference" and not any(k.startswith(("input_encoder", "joint_encoder")) for k in bundle)
    assert any(k.startswith("model.input_encoder.") for k in state_tensors(run))
    # CARSO classifies the synthetic test set well above chance (10 classes).
    from carso_cli.data import build_dataset

    loaded = load_run(run)
    test = build_dataset(loaded.cfg, "test")
    x = torch.stack([test[i][0] for i in range(200)])
    y = torch.tensor([test[i][1] for i in range(200)])
    torch.manual_seed(0)
    with torch.no_grad():
        accuracy = (loaded.carso()(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.3


def test_resume_after_sigterm_equals_uninterrupted(
    tmp_path: Path, classifier_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = train_purifier.run(tiny_cfg(), classifier_file, tmp_path / "whole", device=CPU).run

    # SIGTERM during the 4th step (epoch 1, batch 0), after its stop flag was sampled: the next batch
    # sees it and finishes, then a consistent mid-epoch checkpoint is written and the command stops.
    interrupt_at_reduce(monkeypatch, 4)
    out = tmp_path / "interrupted"
    result = runner.invoke(app, cli_args(classifier_file, out))
    assert result.exit_code == 1, result.output
    assert "stopped by SIGTERM at epoch 1, batch 2" in result.output and "--resume" in result.output
    assert not (out / ckpt.PURIFIER_FILE).exists()
    monkeypatch.undo()

    # The command the user typed, with --resume added (issue 7: the run's re-serialised classifier copy
    # never has the bytes of the user's file; the sha256 recorded at the start is what is compared).
    result = runner.invoke(app, cli_args(classifier_file, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output and "from epoch 1, batch 2" in result.output
    expected, got = state_tensors(whole), state_tensors(out)
    assert expected.keys() == got.keys()
    assert any(k.startswith("lookahead.slow.") for k in got) and any(".exp_avg_sq" in k for k in got)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    for name in (ckpt.PURIFIER_FILE, ckpt.CLASSIFIER_FILE):
        a, _ = ckpt.load_tensors(whole / name)
        b, _ = ckpt.load_tensors(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        return [(r["epoch"], r["loss"]) for r in tr.read_metrics(run / ckpt.METRICS_FILE)]

    assert losses(out) == losses(whole)

    # Extending a finished run: --resume --epochs 3 continues from epoch 2.
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--resume",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--epochs",
            "3",
            "--set",
            "training.checkpoint_every=5",
        ],
    )
    assert result.exit_code == 0 and "from epoch 2, batch 0" in result.output
    assert [r["epoch"] for r in tr.read_metrics(out / ckpt.METRICS_FILE)] == [0, 1, 2]
    for extra, text in ((["--batch-size", "32"], "global batch of 16"), (["--preset", "cifar10"], "not the preset")):
        result = runner.invoke(
            app, ["train-purifier", "--resume", "--out", str(out), "--device", "cpu", "--epochs", "4", *extra]
        )
        assert result.exit_code == 1 and text in result.output, result.output


def test_slow_weights_are_saved(tmp_path: Path, classifier_file: Path) -> None:
    """After 3 steps with k = 2 the model holds fast weights; the bundle holds the slow ones."""
    run = train_purifier.run(tiny_cfg("training.epochs=1"), classifier_file, tmp_path / "r", device=CPU).run
    state = tr.load_training_state(run / train_purifier.CHECKPOINT, "purifier")
    bundle, _ = ckpt.load_tensors(run / ckpt.PURIFIER_FILE)
    purifier = train_purifier.build_purifier(tiny_cfg(), build_classifier(tiny_cfg()))
    names = [n for n, _ in purifier.named_parameters()]
    slow = dict(zip(names, state.optimizer["slow_flat"]))
    assert state.optimizer["counter"] == 3
    for name in names:
        if name in bundle:
            assert torch.equal(bundle[name], slow[name]), name
    moved = [n for n in names if n in bundle and not torch.equal(state.model[n], slow[n])]
    assert moved  # the third (fast) step moved them away from the slow weights


def test_non_finite_loss_names_epoch_and_batch(
    tmp_path: Path, classifier_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tr.vae_loss
    calls = {"n": 0}

    def vae_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        if calls["n"] == 5:  # epoch 1, batch 1
            return tr.VAELoss(loss.total * float("nan"), loss.bce, loss.kl)
        return loss

    monkeypatch.setattr(tr, "vae_loss", vae_loss)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1, batch 1 .*last good checkpoint"):
        train_purifier.run(tiny_cfg(), classifier_file, out, device=CPU)
    state = tr.load_training_state(out / train_purifier.CHECKPOINT, "purifier")
    assert state.position == tr.Position(1, 0)  # the checkpoint after epoch 0 stays
    assert all(torch.isfinite(v).all() for v in state.model.values() if v.is_floating_point())


@pytest.mark.slow
def test_two_processes_gloo_equal_one_process(tmp_path: Path, classifier_file: Path) -> None:
    """``--gpus 2 --device cpu`` (torchrun, gloo, DDP + SyncBatchNorm) = one process with the same global batch.

    Two steps of a global batch of 16 (8 per rank, with attacks), k = 2 so that the Lookahead slow
    update happens. Float reductions across processes differ in order, hence allclose at 1e-5.
    """
    sets = ["data.synthetic_train_size=32", "training.epochs=1"]
    one = train_purifier.run(tiny_cfg(*sets), classifier_file, tmp_path / "one", device=CPU).run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [a for s in (*TINY, *sets) for a in ("--set", s)]
    cmd = [
        sys.executable,
        "-m",
        "carso_cli",
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
        str(tmp_path / "two"),
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    meta = ckpt.read_metadata(tmp_path / "two" / train_purifier.CHECKPOINT)
    assert '"world_size": 2' in meta["state"]
    a, b = state_tensors(one), state_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    assert any(k.startswith("lookahead.slow.") for k in a)
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())
        else:
            assert torch.equal(a[k], b[k]), k
    # the weights did change in these two steps
    init = train_purifier.build_purifier(tiny_cfg(), build_classifier(tiny_cfg()))
    assert not torch.allclose(a["model.decoder.fc.weight"], init.state_dict()["decoder.fc.weight"])


def test_cli_errors(tmp_path: Path, classifier_file: Path) -> None:
    cases = [
        (cli_args(tmp_path / "missing.safetensors", tmp_path / "a"), "file not found"),  # and no run dir made
        (["train-purifier", "--classifier", str(classifier_file), "--device", "cpu"], "--preset is required"),
        (["train-purifier", "--resume", "--out", str(tmp_path / "nothing"), "--device", "cpu"], "cannot resume"),
        (cli_args(classifier_file, tmp_path / "b", "--set", "training.batch_size=64"), "fewer than one batch"),
    ]
    for args, text in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "error:" in result.output and text in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "b").exists()  # failed after its directory was made: removed again
    wrong = tmp_path / "wrong.safetensors"
    ckpt.save_tensors(wrong, {"w": torch.zeros(3)})
    result = runner.invoke(app, cli_args(wrong, tmp_path / "c"))
    assert result.exit_code == 1 and "do not match the model" in result.output
    assert not (tmp_path / "c").exists()


def test_unreadable_classifier_names_the_reason(tmp_path: Path, classifier_file: Path) -> None:
    """Issue 7.4: ``--classifier EMPTY.pt`` (and a truncated file) say why, never an empty reason."""
    empty = tmp_path / "EMPTY.pt"
    empty.write_bytes(b"")
    good_pt = tmp_path / "good.pt"
    torch.save(ckpt.load_tensors(classifier_file)[0], good_pt)
    cut_pt = tmp_path / "cut.pt"
    cut_pt.write_bytes(good_pt.read_bytes()[:1000])
    cut_st = tmp_path / "cut.safetensors"
    cut_st.write_bytes(classifier_file.read_bytes()[:1000])
    torch_pt, safetensors = "is not a readable torch checkpoint:", "is not a readable safetensors file"
    for path, text, why in (
        (empty, torch_pt, "the file is empty (0 bytes)"),
        (cut_pt, torch_pt, ""),
        (cut_st, safetensors, ""),
    ):
        result = runner.invoke(app, cli_args(path, tmp_path / "run"))
        assert result.exit_code == 1 and text in result.output, result.output
        reason = " ".join(result.output.split()).split(text, 1)[1].strip()
        assert reason.startswith(why) and len(reason) > 3 and "Traceback" not in result.output, result.output
        assert not (tmp_path / "run").exists()


def test_failed_start_leaves_nothing(tmp_path: Path, classifier_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 7.2: data that cannot be read fails before a run directory is made (default or --out); a
    failure after it was made removes what it made, never what was there or a run with a checkpoint."""
    from carso_cli import data
    from carso_cli.errors import DataError

    monkeypatch.chdir(tmp_path)
    real = data.build_dataset

    def offline(*args, **kwargs):
        raise DataError("cannot download CIFAR-10: no network")

    monkeypatch.setattr(data, "build_dataset", offline)
    for args in (
        cli_args(classifier_file, tmp_path / "r1"),
        [a for a in cli_args(classifier_file, tmp_path / "x") if a not in ("--out", str(tmp_path / "x"))],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "no network" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no r1, no runs/smoke-<time>
    monkeypatch.setattr(data, "build_dataset", real)

    # An existing --out with the user's own file: a start failing inside training removes only its files.
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(app, cli_args(classifier_file, out, "--set", "training.batch_size=64"))
    assert result.exit_code == 1 and "fewer than one batch" in result.output, result.output
    # (the lock file stays: removing a lock file another process may be opening would let two lock it)
    assert sorted(p.name for p in out.iterdir()) == [".carso.lock", "notes.txt"]

    # A resumed run that fails keeps everything it had.
    run = train_purifier.run(tiny_cfg("training.epochs=1"), classifier_file, tmp_path / "done", device=CPU).run
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    result = runner.invoke(
        app, ["train-purifier", "--resume", "--out", str(run), "--device", "cpu", "--epochs", "2", "--batch-size", "32"]
    )
    assert result.exit_code == 1 and "global batch of 16" in result.output
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_resume_with_another_classifier_is_refused(tmp_path: Path, classifier_file: Path) -> None:
    out = tmp_path / "run"
    train_purifier.run(tiny_cfg("training.epochs=1"), classifier_file, out, device=CPU)
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    ckpt.save_tensors(other, build_classifier(load_config("smoke")).state_dict())
    result = runner.invoke(app, cli_args(other, out, "--resume", "--epochs", "2"))
    assert result.exit_code == 1 and "differs from the classifier of" in result.output, result.output
    # The same weights re-saved with other metadata (a .pt): the same classifier, tensor by tensor.
    same_pt = tmp_path / "same.pt"
    torch.save({"state_dict": ckpt.load_tensors(classifier_file)[0]}, same_pt)
    assert ckpt.same_classifier(same_pt, out) and not ckpt.same_classifier(other, out)


def test_gpus_without_cuda_is_an_error(tmp_path: Path, classifier_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 7.3: ``--gpus 2`` with no CUDA visible refuses, instead of starting two CPU processes."""
    from carso_cli import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launched: list[list[str]] = []
    monkeypatch.setattr(distributed, "relaunch", lambda n, argv, **_: launched.append(argv) or 0)
    result = runner.invoke(
        app,
        [
            "train-purifier",
            "--preset",
            "smoke",
            "--classifier",
            str(classifier_file),
            "--out",
            str(tmp_path / "g"),
            "--gpus",
            "2",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "--gpus 2: no CUDA device visible; --device cpu runs 2 CPU processes" in result.output
    assert launched == [] and not (tmp_path / "g").exists()
    result = runner.invoke(app, [*cli_args(classifier_file, tmp_path / "g"), "--gpus", "2"])  # --device cpu
    assert result.exit_code == 0 and len(launched) == 1 and "--device" in launched[0]


def test_plot_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for e, lr in enumerate([1e-4, 1e-2, 5e-3]):
        tr.append_metrics(
            run / ckpt.METRICS_FILE, {"epoch": e, "loss": 10 - e, "bce": 9 - e, "kl": 1.0, "beta": e / 2, "lr": lr}
        )
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, ["plot", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "no metrics file" in result.output


def test_a_preset_typo_in_micro_batch_names_the_preset_key(tmp_path: Path, classifier_file: Path) -> None:
    """Issue 19: a bad ``training.micro_batch`` in a preset is reported against that key, before anything is
    written, and not as a bad ``--micro-batch`` (an option the user never typed)."""
    preset = tmp_path / "typo.toml"
    preset.write_text('extends = "smoke"\n[training]\nmicro_batch = -2\n')
    args = cli_args(classifier_file, tmp_path / "run", "--preset", str(preset))
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "'training.micro_batch'" in result.output and str(preset) in " ".join(result.output.split())
    assert "--micro-batch" not in result.output and not (tmp_path / "run").exists()
    # The option itself is still checked as the option.
    result = runner.invoke(app, [*cli_args(classifier_file, tmp_path / "run"), "--micro-batch", "-2"])
    assert result.exit_code == 1 and "--micro-batch" in result.output and not (tmp_path / "run").exists()
