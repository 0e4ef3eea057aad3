"""carso as outside code uses it: ``carso_cli.load`` under AutoAttack and torchattacks, the README's
example as printed, ``load`` agreeing with ``carso predict``, and the pyautoattack internals carso
relies on (``evaluation._set_apgd_iterations`` and ``autoattack_flags``' wrapped ``perturb``)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import carso_cli
from carso_cli.aggregation import probabilities
from carso_cli.cli import app
from carso_cli.errors import CarsoError
from carso_cli.images import load_image, to_float

EPS = 8 / 255
README = Path(__file__).resolve().parents[1] / "README.md"


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_public_surface_is_small_and_lazy() -> None:
    import subprocess
    import sys

    assert carso_cli.__all__ == ["CarsoError", "load", "load_classifier"]
    code = "import sys, carso_cli; assert 'torch' not in sys.modules; carso_cli.load; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_readme_example_runs_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from conftest import make_random_run

    section = README.read_text().split("## Python API and adversarial examples", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    make_random_run(tmp_path / "runs" / "my-run")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip().endswith("tensor(True)")


def test_module_contract(tiny_run: Path) -> None:
    model = carso_cli.load(tiny_run, seed=1, samples=4)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x = _images().requires_grad_()
    scores = model(x)
    assert scores.shape == (4, 10) and torch.isfinite(scores).all()
    scores[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # end-to-end differentiable
    again = carso_cli.load(tiny_run, seed=1, samples=4)
    with torch.no_grad():
        first, second = again(x), again(x)
    assert torch.equal(first, scores.detach())  # same seed, same draws
    assert not torch.equal(first, second)  # each forward draws new z (stochastic)
    logits = carso_cli.load_classifier(tiny_run)(x)
    assert logits.shape == (4, 10) and torch.equal(logits, model.classifier(x))
    with pytest.raises(CarsoError, match="unknown aggregation"):
        carso_cli.load(tiny_run, aggregation="mean")
    with pytest.raises(CarsoError, match="no-such-run"):
        carso_cli.load("no-such-run")


def test_load_predictions_equal_carso_predict(tiny_run: Path, tmp_path: Path) -> None:
    paths = []
    for i, img in enumerate(_images(3)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(paths[-1])
    out = CliRunner().invoke(
        app, ["predict", *map(str, paths), "--run", str(tiny_run), "--seed", "7", "--json", "--device", "cpu"]
    )
    assert out.exit_code == 0, out.output
    cli_probs = torch.tensor([p["probabilities"] for p in json.loads(out.stdout)], dtype=torch.float64)
    model = carso_cli.load(tiny_run, seed=7)
    x = to_float(torch.stack([load_image(p, 32, 3).pixels for p in paths]))
    with torch.no_grad():
        api_probs = probabilities(model(x).float(), model.aggregation).double()
    torch.testing.assert_close(api_probs, cli_probs, rtol=0, atol=1e-6)


def test_randomized_autoattack_runs_on_the_loaded_module(tiny_run: Path) -> None:
    from pyautoattack import AutoAttack

    model = carso_cli.load(tiny_run, samples=2)
    x, y = _images(4), torch.arange(4)
    aa = AutoAttack(model, norm="Linf", eps=EPS, version="rand", device="cpu")
    aa.apgd.n_iter, aa.apgd.eot_iter = 2, 2  # a few steps: the contract, not the number
    x_adv = aa.run_standard_evaluation(x, y, batch_size=4)
    if isinstance(x_adv, tuple):
        x_adv = x_adv[0]
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_torchattacks_pgd_runs_on_the_loaded_module(tiny_run: Path) -> None:
    import torchattacks

    model = carso_cli.load(tiny_run, samples=2, seed=0)
    x, y = _images(4), torch.arange(4)
    x_adv = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=2, random_start=False)(x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and (x_adv - x).abs().max() > 0  # the gradient moved it


@pytest.mark.parametrize("attribute", ["n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr", "eot_iter"])
def test_pyautoattack_apgd_still_has_what_carso_sets(attribute: str) -> None:
    """carso rewrites these APGD attributes (evaluation._set_apgd_iterations, make_autoattack): a release
    that renamed one would silently run the paper's attack with other settings (pinned ~=0.2.0)."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(torch.nn.Flatten(), norm="Linf", eps=EPS, version="rand", device="cpu")
    assert hasattr(aa.apgd, attribute), f"pyautoattack's APGD has no attribute '{attribute}' any more"
    source = inspect.getsource(type(aa.apgd))
    assert f"self.{attribute}" in source, f"pyautoattack's APGD no longer reads '{attribute}'"


def test_pyautoattack_still_calls_the_perturb_carso_wraps() -> None:
    """autoattack_flags replaces ``aa.apgd.perturb`` to keep APGD's candidates: AutoAttack must call it."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(torch.nn.Flatten(), norm="Linf", eps=EPS, version="rand", device="cpu")
    assert callable(getattr(aa.apgd, "perturb", None)), "pyautoattack's APGD has no attribute 'perturb' any more"
    assert list(inspect.signature(aa.apgd.perturb).parameters)[:2] == ["x", "y"], "APGD.perturb(x, y) changed"
    assert "self.apgd.perturb(" in inspect.getsource(type(aa).run_standard_evaluation), (
        "AutoAttack.run_standard_evaluation no longer calls 'apgd.perturb'"
    )
    for attribute in ("fab", "square", "apgd_targeted"):
        assert hasattr(aa, attribute), f"pyautoattack's AutoAttack has no attribute '{attribute}' any more"
    assert hasattr(aa.fab, "n_iter") and hasattr(aa.square, "n_queries")
