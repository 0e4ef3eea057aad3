"""Weights on disk: safetensors with metadata, atomic writes, strict loading, run directories.

Rules: everything carso writes is safetensors (or JSON/TOML text), written to a temporary file and
renamed into place, so an interrupted write never leaves a truncated file. Foreign ``.pt``/``.pth``
files are read with ``torch.load(..., weights_only=True)`` only: a checkpoint can never run code.
Loading is strict: a key or shape mismatch names the first mismatching keys.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from carso_cli.errors import CarsoError, CheckpointError, DiskWriteError, reason
from carso_cli.memory import format_bytes

# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


# OSErrors that mean "this disk or directory cannot take the write", not a bug: one line for the user.
_DISK_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def disk_write_error(err: OSError, path: Path) -> DiskWriteError | None:
    """The ``DiskWriteError`` for a full/read-only/forbidden target, None for any other OSError."""
    what = _DISK_ERRORS.get(err.errno or 0)
    return None if what is None else DiskWriteError(f"{what} while writing {path}")


# safetensors (Rust) raises its own SafetensorError, not OSError: the errno is only in its text,
# "Error while serializing: I/O error: No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error_of(err: Exception, path: Path) -> OSError | None:
    """The OSError behind a library's I/O error (safetensors' ``SafetensorError``), None if none is named."""
    found = _RUST_OS_ERROR.search(str(err))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: an existing file's own, else 0666 minus the umask.

    (``mkstemp`` makes 0600 files, which would keep a run from collaborators on shared storage.)
    """
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """This process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    A failure at any point (including a full or read-only disk, raised as ``DiskWriteError``) leaves
    ``path`` as it was — the previous version or nothing — and removes the temporary file. The file
    gets the permissions ``open()`` would give it (``file_mode``).
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        # After the body: a writer such as safetensors may have replaced the temporary file with its own.
        os.chmod(tmp_path, file_mode(path))
        os.replace(tmp_path, path)
    except OSError as err:
        disk = disk_write_error(err, path)
        if disk is None:
            raise
        raise disk from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def remove_temporaries(directory: str | Path, prefix: str = "") -> None:
    """Remove the temporary files ``atomic_path`` made for ``directory/prefix…`` and a killed process
    left behind (they never carry a final name). Call it holding the directory's lock."""
    for tmp in Path(directory).glob(f".{prefix}*.tmp"):
        tmp.unlink(missing_ok=True)


@contextmanager
def checkpoint_write(path: str | Path) -> Iterator[None]:
    """Around a training's writes (checkpoints, metrics, final files): a write that fails for lack of
    space or permission says which checkpoint ``path`` is still good, and what to do."""
    path = Path(path)
    try:
        yield
    except DiskWriteError as err:
        kept = intact_checkpoint(path)
        if kept is not None:
            kept += " is intact; free space and rerun with --resume"
        else:
            kept = "no checkpoint was written yet, so the training so far is lost; free space and start again"
        raise DiskWriteError(f"{err}; {kept}") from None


def intact_checkpoint(path: Path) -> str | None:
    """'the last checkpoint, epoch E,' (and 'batch B,' mid-epoch) of the training checkpoint ``path``; None if none."""
    try:
        meta = read_metadata(path)
    except CheckpointError:
        return None
    batch = meta.get("batch", "0")
    return f"the last checkpoint, epoch {meta.get('epoch')}," + (f" batch {batch}," if batch != "0" else "")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------------------------
# safetensors
# ----------------------------------------------------------------------------------------------


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` (made contiguous, on CPU) with a string→string metadata header."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    try:
        with atomic_path(path) as tmp:
            try:
                save_file(clean, str(tmp), metadata=metadata)
            except SafetensorError as err:  # a full disk, say: an OSError for atomic_path to judge
                raise (os_error_of(err, Path(path)) or err) from None
    except DiskWriteError as err:
        size = sum(v.numel() * v.element_size() for v in clean.values())
        raise DiskWriteError(f"{err} ({format_bytes(size)})") from None


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a clear CheckpointError if missing/truncated/foreign."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types and OSError; all mean "unreadable"
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated, damaged or another format): "
            f"{why_unreadable(path, err)}"
        ) from None
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return fh.metadata() or {}
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {why_unreadable(path, err)}") from None


# ----------------------------------------------------------------------------------------------
# State dicts from any supported file
# ----------------------------------------------------------------------------------------------

_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors`` or a torch ``.pt``/``.pth`` file.

    Torch files are loaded with ``weights_only=True``; nested ``state_dict`` / ``model`` entries are
    unwrapped and ``module.`` (DataParallel/DDP) and ``_orig_mod.`` (torch.compile) prefixes stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    if path.suffix == ".safetensors":
        sd, _ = load_tensors(path)
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{path}: refused to load — it needs code execution to unpickle, and carso only loads "
                f"plain weights (torch.load weights_only=True). Re-save it as a state dict. ({reason(err)})"
            ) from None
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable torch checkpoint: {why_unreadable(path, err)}") from None
        while isinstance(obj, dict):
            nested = next((k for k in _NESTED_KEYS if k in obj and isinstance(obj[k], dict)), None)
            if nested is None:
                break
            obj = obj[nested]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path} does not hold a state dict of tensors")
        sd = dict(obj)
    return _strip_prefixes(sd)


def why_unreadable(path: str | Path, err: BaseException) -> str:
    """Why a weights file failed to load, never empty: an empty file says so; else the loader's reason."""
    try:
        if Path(path).stat().st_size == 0:
            return "the file is empty (0 bytes)"
    except OSError as stat_err:
        return reason(stat_err)
    text = reason(err)
    if isinstance(err, EOFError) or text in ("EOFError", "Ran out of input"):
        return f"the file ends too early (truncated?): {text}"
    return text


def load_into(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str = "weights") -> None:
    """Strict ``load_state_dict`` with an error that names the first mismatching keys and shapes."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
    if shapes:
        problems.append(f"shape mismatch: {', '.join(shapes[:3])}{' …' if len(shapes) > 3 else ''}")
    if problems:
        raise CheckpointError(f"{what} do not match the model — " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------

RUNS_ROOT = Path("runs")
CONFIG_FILE = "config.toml"
CLASSIFIER_FILE = "classifier.safetensors"
CLASSIFIER_REF_FILE = "classifier.json"  # {"path": ..., "sha256": ...} when weights are not copied
PURIFIER_FILE = "purifier.safetensors"  # inference bundle: condition encoder + decoder
METRICS_FILE = "metrics.jsonl"


def new_run_dir(name: str, root: str | Path = RUNS_ROOT) -> Path:
    """A fresh ``root/NAME-YYYYmmdd-HHMMSS`` directory (suffixed if that exists, even when two
    processes pick a name in the same second: ``mkdir`` either makes it or fails)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = root / f"{name}-{stamp}"
    run = base
    k = 1
    while True:
        try:
            run.mkdir()
            return run
        except FileExistsError:
            run = Path(f"{base}-{k}")
            k += 1


@contextmanager
def undo_on_failure(
    directory: Path, made: bool, keep: list[Path], prefix: str = "", tell: bool = False
) -> Iterator[None]:
    """If the body fails before any of ``keep`` (a run's checkpoints) exists, remove what it made.

    ``made``: the body's caller created ``directory`` (then it goes entirely); otherwise only the
    entries of ``directory`` named ``prefix…`` that were not there on entry go (enter it after the
    run's lock: the lock file stays, as removing a lock file another process may be opening would let
    two processes lock it). Anything of a run that has a checkpoint stays: that run is resumable.
    ``tell``: a ``CarsoError`` that made it remove something says what went and after how long (a
    training that fails before its first checkpoint, e.g. on a full disk, loses that work).
    """
    directory = Path(directory)
    before = set() if made else {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    started = time.monotonic()
    try:
        yield
    except BaseException as err:
        if any(Path(k).exists() for k in keep) or not directory.is_dir():
            raise
        if made:
            shutil.rmtree(directory, ignore_errors=True)
            removed = [directory]
        else:
            removed = [p for p in directory.iterdir() if p.name not in before and p.name.startswith(prefix)]
            for p in removed:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        if tell and isinstance(err, CarsoError) and removed:
            what = str(directory) if made else "what it had written in " + str(directory)
            seconds = time.monotonic() - started
            worked = f"after {format_duration(seconds)} of work: " if seconds >= 1 else ""
            raise type(err)(f"{err} ({worked}with no checkpoint to resume from, {what} was removed)") from None
        raise


def format_duration(seconds: float) -> str:
    """42 s, 3.5 min, 2.1 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def latest_run(root: str | Path = RUNS_ROOT, require: str | None = PURIFIER_FILE) -> Path:
    """The most recently modified run directory under ``root`` (holding ``require`` if given)."""
    root = Path(root)
    runs = [p for p in root.glob("*") if p.is_dir() and is_run_dir(p) and (require is None or (p / require).is_file())]
    if not runs:
        what = f" with a {require}" if require else ""
        raise CheckpointError(
            f"no run directory{what} under ./{root} — train one (carso train-purifier / carso demo) or pass --run DIR"
        )
    return max(runs, key=lambda p: (p / (require or CONFIG_FILE)).stat().st_mtime)


def resolve_run(run: str | Path | None, require: str | None = PURIFIER_FILE) -> Path:
    """``--run DIR`` if given (checked), else the latest run under ./runs."""
    if run is None:
        return latest_run(require=require)
    path = Path(run)
    if not path.is_dir():
        raise CheckpointError(f"run directory not found: {path}")
    if not is_run_dir(path):
        raise CheckpointError(f"{path} is not a carso run directory (no {CONFIG_FILE})")
    if require and not (path / require).is_file():
        raise CheckpointError(f"{path} has no {require} (is its training finished?)")
    return path


def write_classifier_reference(run: Path, classifier_path: Path) -> None:
    atomic_write_json(
        run / CLASSIFIER_REF_FILE,
        {"path": str(Path(classifier_path).resolve()), "sha256": sha256_file(classifier_path)},
    )


def same_classifier(path: str | Path, run: Path) -> bool:
    """Whether the weights file ``path`` is the classifier ``run`` was trained with.

    The run's own ``classifier.safetensors`` is a re-serialisation (other metadata, prefixes stripped),
    so its bytes never equal the user's file: compare with the source's sha256 recorded at the start
    (``classifier.json``), else tensor by tensor.
    """
    ref = run / CLASSIFIER_REF_FILE
    if ref.is_file():
        try:
            recorded = json.loads(ref.read_text()).get("sha256")
        except ValueError:
            recorded = None
        if recorded is not None and recorded == sha256_file(path):
            return True
    own = run / CLASSIFIER_FILE
    if not own.is_file():
        return sha256_file(path) == sha256_file(classifier_path_of(run))
    theirs, _ = load_tensors(own)
    mine = load_state_dict_file(path)
    return mine.keys() == theirs.keys() and all(
        mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine
    )


def classifier_path_of(run: Path) -> Path:
    """The classifier weights of a run: its own copy, or the referenced file (sha256-checked)."""
    own = run / CLASSIFIER_FILE
    if own.is_file():
        return own
    ref = run / CLASSIFIER_REF_FILE
    if not ref.is_file():
        raise CheckpointError(f"{run} has neither {CLASSIFIER_FILE} nor {CLASSIFIER_REF_FILE}")
    info = json.loads(ref.read_text())
    path = Path(info["path"])
    if not path.is_file():
        raise CheckpointError(f"{run}: the classifier it refers to is gone: {path}")
    if sha256_file(path) != info.get("sha256"):
        raise CheckpointError(f"{run}: the classifier file {path} changed since training (sha256 differs)")
    return path
