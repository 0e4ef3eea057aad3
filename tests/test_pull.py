"""``carso pull`` and zoo names for ``--classifier``, against a real HTTP server on the loopback interface.

The server (the standard library's, in a thread, with a small handler that answers ``Range`` requests
and can cut a response short) serves files in the authors' format, made as the convert tests make
them; a test zoo of smoke-preset entries points at it through ``CARSO_ZOO_URL``.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_convert import published_files
from typer.testing import CliRunner

from carso_cli import checkpoint as ckpt
from carso_cli import zoo
from carso_cli.cli import app
from carso_cli.config import load_config
from carso_cli.errors import CarsoError

runner = CliRunner()
ROLES = ("classifier", "repr_compressors", "repr_fcn_compressor", "decoder")
FOLDER = "smoke_wrn101/models"  # relative paths as the authors' bucket has them


# ----------------------------------------------------------------------------------------------
# A Range-capable HTTP server
# ----------------------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-`` (206) support; ``server.cut[path] = n`` sends only n body bytes once."""

    def do_GET(self) -> None:
        rel = self.path.lstrip("/")
        rng = self.headers.get("Range")
        self.server.log.append((rel, rng))  # type: ignore[attr-defined]
        path = self.server.root / rel  # type: ignore[attr-defined]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        if self.server.ignore_range:  # type: ignore[attr-defined]
            rng = None  # as a server without Range support does: 200 and the whole file
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0  # type: ignore[union-attr]
        if start >= len(data) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.cut.pop(rel, None)  # type: ignore[attr-defined]
        self.wfile.write(body if cut is None else body[:cut])  # then the connection closes (HTTP/1.0)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """(server root, role → file): the smoke files in the authors' format, under FOLDER."""
    root = tmp_path_factory.mktemp("bucket")
    paths, *_ = published_files(root / FOLDER, load_config("smoke"))
    return root, paths


@pytest.fixture(scope="module")
def server(published: tuple[Path, dict[str, Path]]):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.root, httpd.log, httpd.cut, httpd.ignore_range = published[0], [], {}, False  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_zoo(path: Path, files: dict[str, Path], root: Path, sha256: dict[str, str] | None = None) -> Path:
    rel = {role: p.relative_to(root).as_posix() for role, p in files.items()}
    purifier = "\n".join(f'purifier.{r} = "{rel[r]}"' for r in ROLES[1:])
    sha = "\n".join(f'sha256.{r} = "{d}"' for r, d in (sha256 or {}).items())
    path.write_text(f"""base_url = "https://example.invalid/never-used/"

[models.smoke-ref]
preset = "smoke"
title = "smoke files in the authors' format"
classifier = "{rel["classifier"]}"
{purifier}
{sha}
reported_in = "nowhere"
reported = {{ "C/Cl" = 0.5 }}

[models.smoke-cls]
preset = "smoke"
title = "a classifier only"
classifier = "{rel["classifier"]}"

[models.not-on-server]
preset = "smoke"
title = "a file the server does not have"
classifier = "{FOLDER}/nope.safetensors"

[models.wrong-preset]
preset = "cifar10"
title = "smoke files under the wrong preset"
classifier = "{rel["classifier"]}"
{purifier}
""")
    return path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server, published):
    """The test zoo served by ``server``, an empty cache, and a fresh working directory."""
    root, files = published
    monkeypatch.setattr(zoo, "ZOO_FILE", _write_zoo(tmp_path / "zoo.toml", files, root))
    monkeypatch.setenv(zoo.URL_ENV, f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    server.log.clear()
    server.cut.clear()
    yield tmp_path
    server.ignore_range = False


def _pull(*args: str):
    return runner.invoke(app, ["pull", *args])


def _gets(server, role: str) -> list[str | None]:
    """The Range headers of the requests for ``role``'s file."""
    name = f"wrn_smoke_{role}.safetensors"
    return [rng for rel, rng in server.log if rel.endswith(name)]


# ----------------------------------------------------------------------------------------------
# A full pull
# ----------------------------------------------------------------------------------------------


def test_pull_gives_the_run_convert_reference_gives(env: Path, server, published) -> None:
    _, files = published
    result = _pull("smoke-ref")
    assert result.exit_code == 0, result.output
    run = env / "runs" / "smoke-ref"  # the default --out
    assert f"wrote {Path('runs') / 'smoke-ref'}" in result.output and "carso eval --run" in result.output

    # Cached under the same relative paths, complete, no partial files; sha256s recorded in the run.
    record = json.loads((run / zoo.RECORD_FILE).read_text())
    assert record["name"] == "smoke-ref" and record["preset"] == "smoke"
    for role, src in files.items():
        cached = env / "cache" / FOLDER / src.name
        assert cached.read_bytes() == src.read_bytes()
        assert record["files"][role]["sha256"] == _sha(src) and record["files"][role]["url"].endswith(src.name)
    assert not list((env / "cache").rglob("*.part"))

    # The same files through `carso convert reference`: identical weights, identical predictions.
    ref = env / "runs" / "reference"
    args = [a for role in ROLES for a in (f"--{role.replace('_', '-')}", str(files[role]))]
    converted = runner.invoke(app, ["convert", "reference", "--preset", "smoke", *args, "--out", str(ref)])
    assert converted.exit_code == 0, converted.output
    for name in (ckpt.CLASSIFIER_FILE, ckpt.PURIFIER_FILE):
        ours, theirs = ckpt.load_tensors(run / name)[0], ckpt.load_tensors(ref / name)[0]
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    image = env / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(image)
    predictions = []
    for run_dir in (run, ref):
        out = runner.invoke(app, ["predict", str(image), "--run", str(run_dir), "--json", "--samples", "3"])
        assert out.exit_code == 0, out.output
        predictions.append(json.loads(out.stdout))
    assert predictions[0] == predictions[1] and len(predictions[0][0]["probabilities"]) > 0

    # Pulling again downloads nothing and leaves the run as it is.
    requests = len(server.log)
    again = _pull("smoke-ref")
    assert again.exit_code == 0 and "already pulled" in again.output and len(server.log) == requests


def test_classifier_only_entry_is_downloaded_and_named(env: Path, published) -> None:
    _, files = published
    result = _pull("smoke-cls")
    assert result.exit_code == 0, result.output
    cached = env / "cache" / FOLDER / files["classifier"].name
    assert cached.read_bytes() == files["classifier"].read_bytes()
    assert "--classifier smoke-cls" in result.output
    assert not (env / "runs").exists()  # no run: there is no purifier to convert
    other = _pull("smoke-cls", "--cache", str(env / "elsewhere"), "--out", "runs/x")
    assert other.exit_code == 0 and (env / "elsewhere" / FOLDER / files["classifier"].name).is_file()
    assert "--out is not used" in other.output and not (env / "runs").exists()


# ----------------------------------------------------------------------------------------------
# Broken downloads, wrong files, no server
# ----------------------------------------------------------------------------------------------


def test_a_download_cut_in_the_middle_resumes(env: Path, server, published) -> None:
    _, files = published
    decoder = files["decoder"]
    half = decoder.stat().st_size // 2
    server.cut[decoder.relative_to(published[0]).as_posix()] = half
    first = _pull("smoke-ref", "--out", "runs/a")
    assert first.exit_code == 1 and "Traceback" not in first.output
    part = env / "cache" / FOLDER / (decoder.name + ".part")
    assert "broke off" in first.output and f"kept in {part} (the next try resumes it)" in first.output
    assert part.stat().st_size == half and not (env / "cache" / FOLDER / decoder.name).exists()
    assert not (env / "runs").exists()  # a failed pull makes no run directory

    second = _pull("smoke-ref", "--out", "runs/a")
    assert second.exit_code == 0, second.output
    assert _gets(server, "decoder") == [None, f"bytes={half}-"]  # only the missing half came again
    assert _gets(server, "classifier") == [None]  # complete files are not fetched twice
    assert (env / "cache" / FOLDER / decoder.name).read_bytes() == decoder.read_bytes() and not part.exists()


def test_a_server_without_range_support_sends_the_whole_file_again(env: Path, server, published) -> None:
    _, files = published
    decoder = files["decoder"]
    server.cut[decoder.relative_to(published[0]).as_posix()] = 1000
    assert _pull("smoke-ref").exit_code == 1
    server.ignore_range = True
    result = _pull("smoke-ref")
    assert result.exit_code == 0, result.output
    assert _gets(server, "decoder") == [None, "bytes=1000-"]  # asked for the rest, got a 200 and the whole file
    assert (env / "cache" / FOLDER / decoder.name).read_bytes() == decoder.read_bytes()


def test_a_wrong_checksum_is_refused_and_a_right_one_checked(env: Path, server, published, monkeypatch) -> None:
    root, files = published
    bad = {"decoder": "0" * 64}
    monkeypatch.setattr(zoo, "ZOO_FILE", _write_zoo(env / "bad.toml", files, root, bad))
    result = _pull("smoke-ref")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"has sha256 {_sha(files['decoder'])}, but the zoo expects {'0' * 64}" in result.output
    cached = env / "cache" / FOLDER / files["decoder"].name
    assert not cached.exists() and not cached.with_name(cached.name + ".part").exists()
    assert not (env / "runs").exists()

    # With the right digests the pull succeeds; a cached file damaged later is replaced, not used.
    good = {role: _sha(p) for role, p in files.items()}
    monkeypatch.setattr(zoo, "ZOO_FILE", _write_zoo(env / "good.toml", files, root, good))
    assert _pull("smoke-ref").exit_code == 0
    cached.write_bytes(b"damaged")
    fixed = _pull("smoke-ref", "--out", "runs/again")
    assert fixed.exit_code == 0, fixed.output
    assert cached.read_bytes() == files["decoder"].read_bytes() and len(_gets(server, "decoder")) == 3


def test_an_unreachable_server_is_one_clear_error(env: Path, monkeypatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(zoo.URL_ENV, f"http://127.0.0.1:{port}")
    result = _pull("smoke-ref")
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert f"cannot download http://127.0.0.1:{port}/{FOLDER}/wrn_smoke_classifier.safetensors" in text
    assert "nothing was received" in text
    assert "Manually: download" in text and "carso convert reference --preset smoke --classifier" in text
    assert not (env / "runs").exists()


def test_a_failed_conversion_leaves_no_run(env: Path) -> None:
    result = _pull("wrong-preset", "--out", "runs/w")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "classifier weights" in result.output or "preset 'cifar10'" in result.output
    assert not (env / "runs" / "w").exists()


def test_unknown_names_and_no_name(env: Path) -> None:
    result = _pull("smoke-rf")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no published model named 'smoke-rf'; did you mean smoke-ref" in result.output
    assert "carso pull --list" in result.output
    assert _pull().exit_code == 1
    missing = _pull("not-on-server")
    assert missing.exit_code == 1 and f"{FOLDER}/nope.safetensors: HTTP 404" in missing.output
    assert "Traceback" not in missing.output


def test_list_shows_the_zoo(env: Path) -> None:
    result = runner.invoke(app, ["pull", "--list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in ("smoke-ref", "smoke-cls", " run ", " classifier ", "C/Cl 0.5000"):
        assert text in result.output


# ----------------------------------------------------------------------------------------------
# Zoo names wherever a classifier's weights are asked for
# ----------------------------------------------------------------------------------------------


def test_classifier_option_takes_a_zoo_name(env: Path, published) -> None:
    _, files = published
    out = env / "rep.safetensors"
    result = runner.invoke(
        app,
        [
            "extract",
            "--preset",
            "smoke",
            "--classifier",
            "smoke-cls",
            "--out",
            str(out),
            "--n-examples",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    cached = env / "cache" / FOLDER / files["classifier"].name
    assert zoo.resolve_weights("smoke-cls") == cached and cached.read_bytes() == files["classifier"].read_bytes()
    assert zoo.resolve_weights(str(files["decoder"])) == files["decoder"]  # a path stays a path

    for argv, expect in [
        (
            ["--classifier", "smoke-clss"],
            "'smoke-clss' is neither a file nor a published model; did you mean smoke-cls",
        ),
        (["--classifier", "missing.safetensors"], "--classifier: file not found: missing.safetensors"),
    ]:
        bad = runner.invoke(app, ["train-purifier", "--preset", "smoke", *argv, "--out", str(env / "p")])
        assert bad.exit_code == 1 and expect in " ".join(bad.output.split()) and "Traceback" not in bad.output
        assert not (env / "p").exists()


# ----------------------------------------------------------------------------------------------
# The real zoo
# ----------------------------------------------------------------------------------------------


def test_the_published_zoo_names_the_authors_files() -> None:
    base, models = zoo.load_zoo()
    assert base == "https://bucket.ballarin.cc/aimldl/carso2024cnn/"
    presets = {p.stem for p in (Path(__file__).resolve().parent.parent / "presets").glob("*.toml")}
    for entry in models.values():
        assert entry.preset in presets and entry.title and entry.reported_in and entry.notes
        assert all(p.endswith(".safetensors") for p in entry.files.values())
    a = models["cifar10-cui2023"]
    assert a.preset == "cifar10" and a.files == {
        "classifier": "cifar_10_cuiwrn2810/models/cifar10_a3_b10_t4_20m_w.safetensors",
        **{r: f"cifar_10_cuiwrn2810/models/wrn_28_10_cifar_10_cui_2023_{r}.safetensors" for r in ROLES[1:]},
    }
    assert models["cifar100-cui2023"].preset == "cifar100" and models["tinyimagenet-wang2023"].preset == "tinyimagenet"
    assert (
        models["tinyimagenet-wang2023"]
        .files["decoder"]
        .endswith("wrn_28_10_tinyimagenet_200_wang_2023_decoder.safetensors")
    )
    assert {n for n, e in models.items() if not e.has_purifier} == {
        "cifar10-gowal2020",
        "cifar10-rebuffi2021",
        "cifar100-rebuffi2021",
    }
    # Table 2's figures (later version of the paper) travel with the entries.
    assert models["cifar10-cui2023"].reported["C/randAA"] == 0.7613
    assert models["tinyimagenet-wang2023"].reported["C/Cl"] == 0.5632


def test_python_api_loads_a_zoo_name(env: Path, server) -> None:
    """``carso_cli.load(NAME)``: a zoo name is pulled into runs/NAME (as ``carso pull``) and loaded."""
    import carso_cli

    model = carso_cli.load("smoke-ref", samples=2, seed=0)
    assert (env / "runs" / "smoke-ref" / ckpt.PURIFIER_FILE).is_file()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    requests = len(server.log)
    carso_cli.load("smoke-ref")  # already pulled: nothing downloaded again
    assert len(server.log) == requests
    with pytest.raises(CarsoError, match="smoke-reff"):
        carso_cli.load("smoke-reff")


def test_list_fits_80_columns_with_whole_names_first() -> None:
    """The packaged zoo at 80 columns: each name whole on one line, first on its row; the long text elsewhere."""
    result = runner.invoke(app, ["pull", "--list"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines)
    for name, entry in zoo.entries().items():
        rows = [line for line in lines if name in line.split()]
        assert len(rows) == 1, (name, result.output)
        assert rows[0].split()[0] == name  # the first column
        assert entry.notes not in result.output  # notes moved to --long / --info
    long = runner.invoke(app, ["pull", "--list", "--long"], env={"COLUMNS": "80"})
    assert long.exit_code == 0 and all(len(line) <= 80 for line in long.output.splitlines())
    flat = " ".join(long.output.split())
    for entry in zoo.entries().values():
        assert entry.name in long.output.split() and " ".join(entry.notes.split()) in flat


def test_info_shows_one_model_in_full(env: Path) -> None:
    result = runner.invoke(app, ["pull", "--info", "smoke-ref"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "smoke files in the authors' format" in result.output and "C/Cl 0.5000" in result.output
    assert f"decoder: {zoo.base_url()}{FOLDER}/" in result.output  # the URL whole, on one line
    assert "smoke-cls" not in result.output
    bad = runner.invoke(app, ["pull", "--info", "smoke-rf"])
    assert bad.exit_code == 1 and "did you mean smoke-ref" in bad.output and "Traceback" not in bad.output
    alone = runner.invoke(app, ["pull", "--long"])
    assert alone.exit_code == 1 and "--long goes with --list" in alone.output
