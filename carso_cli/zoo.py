"""The published models (``zoo.toml``) and their download: cache, resume, checksum, atomic rename.

The zoo is data: ``carso_cli/zoo.toml`` lists each model's preset and files (paths relative to a base
URL that the environment variable ``CARSO_ZOO_URL`` overrides, for mirrors and tests). Files go to a
cache (``CARSO_CACHE``, else the platform's user cache directory) under the same relative paths, so a
file is downloaded once for every run and command that uses it.

A download streams into ``FILE.part`` and resumes it with an HTTP ``Range`` request after a failure;
only a complete file whose sha256 matches the zoo's (when the zoo knows it) is renamed onto its final
name — a file that does not match is deleted, never used. Written with ``urllib`` (no new
dependency); the cache directory is resolved by hand for the same reason (``platformdirs`` is not
among carso's dependencies).
"""

from __future__ import annotations

import difflib
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carso_cli import __version__, locking
from carso_cli import checkpoint as ckpt
from carso_cli.config import tomllib
from carso_cli.errors import CarsoError, reason

ZOO_FILE = Path(__file__).resolve().parent / "zoo.toml"
URL_ENV = "CARSO_ZOO_URL"
CACHE_ENV = "CARSO_CACHE"
# The authors' CARSOWrap submodules (models/convert.py), in the order `convert reference` takes them.
PURIFIER_ROLES = ("repr_compressors", "repr_fcn_compressor", "decoder")
ROLES = ("classifier", *PURIFIER_ROLES)
TIMEOUT_S = 30.0
_CHUNK = 1 << 16
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(CarsoError):
    """A download failed or gave a wrong file; what was received so far is kept for the next try."""


@dataclass(frozen=True)
class ZooEntry:
    """One published model: the preset it fits and its files (role → path relative to the base URL)."""

    name: str
    preset: str
    title: str
    files: dict[str, str]
    sha256: dict[str, str] = field(default_factory=dict)
    reported: dict[str, float] = field(default_factory=dict)
    reported_in: str = ""
    notes: str = ""

    @property
    def has_purifier(self) -> bool:
        return all(role in self.files for role in PURIFIER_ROLES)


@dataclass(frozen=True)
class Fetched:
    """A file of an entry, present in the cache."""

    role: str
    url: str
    path: Path
    sha256: str
    bytes: int


# ----------------------------------------------------------------------------------------------
# The zoo
# ----------------------------------------------------------------------------------------------


def _entry(name: str, raw: dict[str, Any], source: Path) -> ZooEntry:
    def bad(why: str) -> CarsoError:
        return CarsoError(f"{source}: model '{name}': {why}")

    unknown = set(raw) - {"preset", "title", "classifier", "purifier", "sha256", "reported", "reported_in", "notes"}
    if unknown:
        raise bad(f"unknown key(s) {', '.join(sorted(unknown))}")
    if not isinstance(raw.get("preset"), str) or not isinstance(raw.get("classifier"), str):
        raise bad("'preset' and 'classifier' are required strings")
    files = {"classifier": raw["classifier"]}
    purifier = raw.get("purifier", {})
    if purifier:
        if set(purifier) != set(PURIFIER_ROLES):
            raise bad(f"'purifier' needs exactly {', '.join(PURIFIER_ROLES)}")
        files.update({role: purifier[role] for role in PURIFIER_ROLES})
    sha = {role: str(v).lower() for role, v in raw.get("sha256", {}).items()}
    for role, digest in sha.items():
        if role not in files or not _SHA256.match(digest):
            raise bad(f"sha256.{role} must be the 64-hex-digit digest of one of its files")
    return ZooEntry(
        name=name,
        preset=raw["preset"],
        title=raw.get("title", ""),
        files=files,
        sha256=sha,
        reported={k: float(v) for k, v in raw.get("reported", {}).items()},
        reported_in=raw.get("reported_in", ""),
        notes=raw.get("notes", ""),
    )


def load_zoo(path: Path | None = None) -> tuple[str, dict[str, ZooEntry]]:
    """(base URL from the file, entries by name) of a zoo TOML (default: the packaged ``zoo.toml``)."""
    path = Path(path or ZOO_FILE)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise CarsoError(f"cannot read the model zoo {path}: {reason(err)}") from None
    models = {name: _entry(name, raw, path) for name, raw in data.get("models", {}).items()}
    return str(data.get("base_url", "")), models


def entries() -> dict[str, ZooEntry]:
    return load_zoo()[1]


def base_url() -> str:
    """``CARSO_ZOO_URL`` if set, else the zoo's own base URL; always ending in '/'."""
    url = os.environ.get(URL_ENV) or load_zoo()[0]
    return url.rstrip("/") + "/"


def url_of(relative: str) -> str:
    return base_url() + relative.lstrip("/")


def get(name: str) -> ZooEntry:
    """The entry called ``name``; an unknown name is one error that suggests the closest names."""
    models = entries()
    if name in models:
        return models[name]
    raise CarsoError(f"no published model named '{name}'{_suggest(name, models)} (carso pull --list shows them all)")


def _suggest(name: str, models: dict[str, ZooEntry]) -> str:
    close = difflib.get_close_matches(name, list(models), n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(close)}?" if close else ""


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``CARSO_CACHE``, else the platform's user cache directory + ``/carso``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "carso"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "carso" / "Cache"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "carso"


def cached_path(relative: str, cache: Path | None = None) -> Path:
    return Path(cache or default_cache_dir()) / relative.lstrip("/")


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _so_far(part: Path, total: int | None = None) -> str:
    have = part.stat().st_size if part.exists() else 0
    if not have:
        return "nothing was received"
    of = f" of {_mib(total)}" if total else ""
    return f"{_mib(have)}{of} kept in {part} (the next try resumes it)"


def _progress(console: Any):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
    )


def download(url: str, dest: Path, sha256: str | None = None, console: Any = None, timeout: float = TIMEOUT_S) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.part``); returns the file's sha256.

    Only a complete file is renamed onto ``dest``, and only if its sha256 equals ``sha256`` (when
    given); a mismatching file is deleted. A failure raises ``DownloadError`` naming the URL and
    what was kept.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": f"carso/{__version__}"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # Range beyond the end: the .part is stale (or complete); start over
            part.unlink()
            return download(url, dest, sha256, console, timeout)
        raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}; {_so_far(part)}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        why = err.reason if isinstance(err, urllib.error.URLError) else err
        raise DownloadError(f"cannot download {url}: {reason(why)}; {_so_far(part)}") from None
    with response:
        if have and response.status != 206:  # the server ignored the Range: the whole file comes again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        try:
            from rich.markup import escape

            with open(part, "ab" if have else "wb") as fh, _progress(console) as progress:
                task = progress.add_task(escape(dest.name), total=total, completed=have)
                while chunk := response.read(_CHUNK):
                    fh.write(chunk)
                    progress.advance(task, len(chunk))
                fh.flush()
                os.fsync(fh.fileno())
        except (OSError, http.client.HTTPException) as err:
            disk = ckpt.disk_write_error(err, part) if isinstance(err, OSError) else None
            if disk is not None:
                raise DownloadError(f"{disk} (downloading {url}); {_so_far(part, total)}") from None
            raise DownloadError(f"download of {url} broke off: {reason(err)}; {_so_far(part, total)}") from None
    size = part.stat().st_size
    if total is not None and size != total:  # urllib returns b"" when a connection closes early
        raise DownloadError(f"download of {url} broke off (the server closed the connection); {_so_far(part, total)}")
    digest = ckpt.sha256_file(part)
    if sha256 and digest != sha256:
        part.unlink()
        raise DownloadError(
            f"{url} has sha256 {digest}, but the zoo expects {sha256}: the file was deleted, "
            "not used (a corrupted download or a changed file on the server; try again, or report it)"
        )
    os.replace(part, dest)
    return digest


def fetch(
    entry: ZooEntry, cache: Path | None = None, console: Any = None, roles: tuple[str, ...] | None = None
) -> dict[str, Fetched]:
    """Make the entry's files (or ``roles`` of them) present in the cache; role → ``Fetched``.

    A cached file is checked against the zoo's sha256 when known (and downloaded again on mismatch).
    Each file is downloaded under a lock, so two carso processes never write one ``.part``.
    """
    out: dict[str, Fetched] = {}
    for role in roles or tuple(entry.files):
        relative = entry.files[role]
        url, path, expected = url_of(relative), cached_path(relative, cache), entry.sha256.get(role)
        try:
            with locking.hold(
                path.parent, hint="another carso process is downloading it; wait for it", lock_file=f".{path.name}.lock"
            ):
                digest = ckpt.sha256_file(path) if path.is_file() else None
                if digest is None or (expected and digest != expected):
                    path.unlink(missing_ok=True)  # a cached file that does not match is never used
                    digest = download(url, path, expected, console)
        except DownloadError as err:
            raise DownloadError(f"{err}\n{manual_hint(entry)}") from None
        out[role] = Fetched(role, url, path, digest, path.stat().st_size)
    return out


def manual_hint(entry: ZooEntry) -> str:
    """The manual alternative to ``carso pull``: the files to fetch and the command that converts them."""
    urls = " ".join(url_of(p) for p in entry.files.values())
    if not entry.has_purifier:
        return f"Manually: download {urls} and pass the file to --classifier."
    names = {role: Path(p).name for role, p in entry.files.items()}
    options = " ".join(f"--{role.replace('_', '-')} {names[role]}" for role in ROLES)
    return (
        f"Manually: download {urls}, then run: carso convert reference --preset {entry.preset} {options} "
        f"--out runs/{entry.name}"
    )


# ----------------------------------------------------------------------------------------------
# Pulling an entry into a run directory (carso pull, carso_cli.load("NAME"))
# ----------------------------------------------------------------------------------------------

RECORD_FILE = "zoo.json"


@dataclass
class PullResult:
    entry: ZooEntry
    files: dict[str, Fetched]
    run: Path | None  # None: a classifier-only entry
    up_to_date: bool = False


def record_of(entry: ZooEntry, files: dict[str, Fetched]) -> dict[str, Any]:
    """What ``zoo.json`` holds: the entry's name and preset, and each file's URL, size and sha256."""
    return {
        "name": entry.name,
        "preset": entry.preset,
        "files": {role: {"url": f.url, "bytes": f.bytes, "sha256": f.sha256} for role, f in files.items()},
    }


def _already_pulled(run: Path, record: dict[str, Any]) -> bool:
    try:
        return json.loads((run / RECORD_FILE).read_text()) == record and ckpt.is_run_dir(run)
    except (OSError, ValueError):
        return False


def pull(
    name: str, out: Path | None = None, cache: Path | None = None, force: bool = False, console: Any = None
) -> PullResult:
    """Download ``name``'s files and, for an entry with a purifier, write the run ``out`` (default runs/NAME).

    The purifier parts are converted by exactly the code of ``carso convert reference``
    (``carso_cli.models.convert``), with ``zoo.json`` recording each file's URL and sha256. The run is
    written under its lock, and a failed conversion removes what it made. An entry without a published
    purifier (Table 18's classifiers) is only downloaded: its path goes to ``--classifier``.
    """
    from carso_cli.config import load_config
    from carso_cli.models import convert  # torch and the models: only once there is something to convert

    entry = get(name)
    files = fetch(entry, cache, console)
    if not entry.has_purifier:
        return PullResult(entry, files, None)
    run_dir = Path(out) if out is not None else ckpt.RUNS_ROOT / entry.name
    record = record_of(entry, files)
    if not force and _already_pulled(run_dir, record):
        return PullResult(entry, files, run_dir, up_to_date=True)
    cfg = load_config(entry.preset)
    made = not run_dir.exists()
    with locking.hold(run_dir), ckpt.undo_on_failure(run_dir, made, keep=[]):
        convert.run(
            convert.ConversionKind.reference, cfg, *(files[role].path for role in ROLES), out=run_dir, force=force
        )
        ckpt.atomic_write_json(run_dir / RECORD_FILE, record)
    return PullResult(entry, files, run_dir)


# ----------------------------------------------------------------------------------------------
# Weights given by name
# ----------------------------------------------------------------------------------------------


def resolve_weights(
    value: str | Path | None, option: str = "--classifier", cache: Path | None = None, console: Any = None
) -> Path | None:
    """A weights option's value as a file: an existing path stays itself; the name of a published
    model becomes its classifier file (downloaded into the cache if needed).

    A missing path, or a word that names no model, is one error (with the closest model names).
    """
    if value is None:
        return None
    path = Path(value)
    if path.exists():
        return path
    models = entries()
    text = str(value)
    if text in models:
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        return fetch(models[text], cache, console, roles=("classifier",))["classifier"].path
    if path.suffix or len(path.parts) > 1:
        raise CarsoError(f"{option}: file not found: {value}")
    raise CarsoError(
        f"{option}: '{value}' is neither a file nor a published model"
        f"{_suggest(text, models)} (carso pull --list shows them all)"
    )
