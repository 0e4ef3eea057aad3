"""Weights on disk: atomic writes, safe loading of foreign files, strict matching, run directories."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from carso_cli import checkpoint as ckpt
from carso_cli.errors import CheckpointError
from carso_cli.models import build_classifier, build_purifier, load_purifier, load_run, save_purifier
from carso_cli.models.wideresnet import WideResNet


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    ckpt.atomic_write_json(target, {"x": 1})
    with pytest.raises(RuntimeError):
        with ckpt.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("interrupted")
    assert target.read_text().strip().startswith("{") and '"x": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_safetensors_roundtrip_with_metadata(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    ckpt.save_tensors(tmp_path / "t.safetensors", tensors, {"k": "v"})
    loaded, meta = ckpt.load_tensors(tmp_path / "t.safetensors")
    assert meta == {"k": "v"} and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_truncated_or_foreign_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    ckpt.save_tensors(path, {"a": torch.randn(100, 100)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        ckpt.load_tensors(path)
    path.write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        ckpt.load_tensors(path)
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.load_tensors(tmp_path / "missing.safetensors")


def test_torch_files_nested_and_prefixed(tmp_path: Path) -> None:
    model = WideResNet(10, 10, 1)
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    for wrapper in ({"state_dict": sd}, {"model": sd, "epoch": 3}, sd):
        path = tmp_path / "w.pt"
        torch.save(wrapper, path)
        other = WideResNet(10, 10, 1)
        ckpt.load_into(other, ckpt.load_state_dict_file(path))
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickles_that_run_code_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        ckpt.load_state_dict_file(path)


def test_mismatch_names_first_keys() -> None:
    model = WideResNet(10, 10, 1)
    sd = model.state_dict()
    bad = dict(sd)
    bad.pop("logits.weight")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys: logits\.weight.*unexpected keys: extra\.weight"):
        ckpt.load_into(model, bad)
    wrong = dict(sd)
    wrong["logits.weight"] = torch.zeros(3, 64)
    with pytest.raises(CheckpointError, match=r"shape mismatch: logits\.weight \(file \(3, 64\), model \(10, 64\)\)"):
        ckpt.load_into(model, wrong)


def test_purifier_file_rebuilds_without_preset(tmp_path: Path, smoke_cfg) -> None:
    torch.manual_seed(0)
    classifier = build_classifier(smoke_cfg).eval()
    purifier = build_purifier(smoke_cfg, classifier).eval()
    save_purifier(tmp_path / "p.safetensors", purifier)
    loaded = load_purifier(tmp_path / "p.safetensors")
    assert loaded.inference_only and loaded.spec == purifier.spec
    rep = [torch.randn(2, *s) for s in purifier.spec.layer_shapes]
    z = torch.randn(3, 2, purifier.spec.fjoint)
    with torch.no_grad():
        assert torch.equal(loaded.sample(rep, z), purifier.sample(rep, z))
    ckpt.save_tensors(tmp_path / "foreign.safetensors", {"a": torch.zeros(1)}, {"format": "other"})
    with pytest.raises(CheckpointError, match="not a carso purifier"):
        load_purifier(tmp_path / "foreign.safetensors")


def test_run_directories(tmp_path: Path, monkeypatch, tiny_run) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = load_run(tiny_run)
    assert loaded.cfg.name == "smoke" and isinstance(loaded.classifier, nn.Module)
    with pytest.raises(CheckpointError, match="no run directory"):
        ckpt.latest_run(tmp_path / "empty")
    time.sleep(0.01)
    newer = ckpt.new_run_dir("smoke", root=tmp_path / "runs")
    assert newer.name.startswith("smoke-")
    assert ckpt.latest_run(tmp_path / "runs") == tiny_run  # the new one has no purifier yet
    with pytest.raises(CheckpointError, match="not a carso run directory"):
        ckpt.resolve_run(newer.parent.parent)
    assert ckpt.resolve_run(None).resolve() == tiny_run.resolve()  # default: latest under ./runs


def test_every_error_has_a_reason(tmp_path: Path) -> None:
    from carso_cli.errors import reason

    assert reason(EOFError()) == "EOFError" and reason(ValueError("bad")) == "bad"
    empty = tmp_path / "EMPTY.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"EMPTY.pt is not a readable torch checkpoint: the file is empty"):
        ckpt.load_state_dict_file(empty)


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch) -> None:
    import errno

    target = tmp_path / "w.safetensors"
    ckpt.save_tensors(target, {"w": torch.ones(2)})

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.DiskWriteError, match=f"no space left on device while writing {target}"):
        ckpt.save_tensors(target, {"w": torch.zeros(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    assert torch.equal(ckpt.load_tensors(target)[0]["w"], torch.ones(2))


def test_safetensors_own_io_error_is_a_disk_write_error(tmp_path: Path, monkeypatch) -> None:
    """safetensors raises SafetensorError (its errno only in the text), not OSError; where no tmpfs can
    be mounted (tests/test_crash.py fills a real one), its exact message stands in for a full disk."""
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    target = tmp_path / "w.safetensors"
    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.DiskWriteError, match=rf"^no space left on device while writing {target} \(32 B\)$"):
        ckpt.save_tensors(target, {"w": torch.zeros(8)})
    assert list(tmp_path.iterdir()) == []

    def other(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: something else")

    monkeypatch.setattr(ckpt, "save_file", other)
    with pytest.raises(SafetensorError, match="something else"):  # not a disk problem: not disguised as one
        ckpt.save_tensors(target, {"w": torch.zeros(8)})
