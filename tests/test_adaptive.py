"""The adaptive evaluation (issue 8): its per-example worst case, the saturation diagnostic, and the test
that can fail — a CARSO whose classifier logits are scaled × 20 saturates the paper's surface, which the
paper's protocol does not see and the adaptive evaluation does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from carso_cli import evaluation as ev
from carso_cli.cli import app
from carso_cli.evaluation import adaptive
from carso_cli.models import CARSO, build_classifier, build_purifier, load_run, set_eval_frozen, write_run

runner = CliRunner()


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    from carso_cli.config import load_config

    cfg = load_config("smoke")
    torch.manual_seed(0)
    classifier = build_classifier(cfg).eval()
    purifier = build_purifier(cfg, classifier, inference_only=True).eval()
    set_eval_frozen(classifier, purifier)
    return classifier, purifier


def test_surface_switches_the_attacked_scores_and_restores(models) -> None:
    carso = CARSO(models[0], models[1], samples=2, aggregation="dexp")
    wrapped = ev.CountCalls(carso, lambda: None)
    with ev.surface(wrapped, "dexp-logsum"):
        assert carso.aggregation == "dexp-logsum"
    assert carso.aggregation == "dexp"
    with pytest.raises(RuntimeError), ev.surface(carso, "logit"):
        raise RuntimeError
    assert carso.aggregation == "dexp"
    assert ev.surfaces_of("dexp") == ["dexp", "dexp-logsum", "dexp-authors"]  # + the paper's protocol's surface
    assert ev.surfaces_of("logit") == ["logit", "dexp", "dexp-logsum"]


def test_saturated_flags_vote_is_saturated_logsum_is_not(models) -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    vote = CARSO(models[0], models[1], samples=2, aggregation="vote")
    assert ev.saturated_flags(vote, x, y, range(4), seed=0).all()  # argmax: exactly zero gradients
    logsum = CARSO(models[0], models[1], samples=2, aggregation="dexp-logsum")
    assert not ev.saturated_flags(logsum, x, y, range(4), seed=0).any()


def test_saturation_summary_flags_above_the_threshold() -> None:
    # Codes: 0 healthy, 1 useless, 2 non-finite (NaN/inf: useless too, and counted apart).
    flags = {
        "saturation_dexp_clean": [1, 2, 0, 0],
        "saturation_dexp_adversarial": [1, 0, 0, 0],
        "saturation_dexp-logsum_clean": [0, 0, 0, 0],
        "carso_clean": [1, 1, 1, 1],
    }
    summary = ev.saturation_summary(flags, 0.25)
    assert summary["surfaces"]["dexp"]["clean"] == {"saturated": 2, "nonfinite": 1, "total": 4, "fraction": 0.5}
    assert summary["surfaces"]["dexp-logsum"]["clean"]["fraction"] == 0.0
    assert summary["flagged"] == ["dexp"]
    assert ev.saturation_summary(flags, 0.5)["flagged"] == []  # "above", not "at"
    assert ev.saturation_summary({"carso_clean": [1]}, 0.1) is None


def test_adaptive_summary_counts_first_breakers() -> None:
    # 5 examples: #0 misclassified clean, #1 broken by randaa, #2 by pgd-eot-logsum, #3 and #4 robust.
    flags = {
        "adaptive_randaa": [-1, 0, 1, 1, 1],
        "adaptive_randaa_logsum": [-1, -1, 1, 1, 1],
        "adaptive_pgd_eot_logsum": [-1, -1, 0, 1, 1],
        "adaptive_transfer_classifier": [-1, -1, -1, 1, 1],
        "adaptive_transfer_logit": [-1, -1, -1, 1, 1],
        "carso_adaptive": [0, 0, 0, 1, 1],
    }
    summary = ev.adaptive_summary(flags, {"randaa": 2.0})
    rows = {a["attack"]: a for a in summary["attacks"]}
    assert list(rows) == list(adaptive.ATTACKS[:5])  # no square unless asked
    assert (rows["randaa"]["attacked"], rows["randaa"]["broken_first"], rows["randaa"]["robust_after"]) == (4, 1, 3)
    assert (rows["pgd-eot-logsum"]["broken_first"], rows["pgd-eot-logsum"]["robust_after"]) == (1, 2)
    assert rows["randaa"]["wall_s"] == 2.0 and rows["transfer-logit"]["wall_s"] == 0.0
    assert summary["worst_case"] == {"correct": 2, "total": 5, "accuracy": 0.4}
    assert ev.adaptive_summary({"carso_clean": [1]}, {}) is None


def test_adaptive_attack_on_a_batch_skips_broken_examples_and_fills_adversarial(models) -> None:
    """One batch through ``evaluate_batch``: the worst case is the AND of every attack, later attacks only
    see the survivors, and each attack's adversarial examples come back on request."""
    carso = CARSO(models[0], models[1], samples=2, aggregation="dexp")
    classifier = models[0]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g)
    # Labels = the model's own clean predictions, so that the attacks have something to break.
    with ev.seeded_latents(carso, ev.ExampleSeededSampler(0, ev.STREAM_CLEAN).bind(range(6))):
        y = carso(x).argmax(dim=-1)
    s = ev.EvalSettings(
        attack="adaptive",
        targets=["carso"],
        n_examples=6,
        batch_size=6,
        samples=2,
        repeats=2,
        aa_steps=2,
        aa_eot=1,
        pgd_steps=2,
        pgd_eot=1,
        square=True,
        square_queries=5,
    )
    adv: dict[str, torch.Tensor] = {}
    out = ev.evaluate_batch(classifier, carso, x, y, range(6), s, torch.device("cpu"), adversarial=adv)
    names = [adaptive.flag_key(a) for a in adaptive.ATTACKS]  # square included
    alive = torch.tensor(out["carso_clean"]).bool()
    for key in names:
        f = torch.tensor(out[key])
        assert ((f == -1) == ~alive).all() or key == names[0], key  # only the survivors are attacked
        alive &= f != 0
    assert out["carso_adaptive"] == [int(a) for a in alive]
    assert all(a <= r for a, r in zip(out["carso_adaptive"], out["carso_randaa"]))
    assert set(out["adaptive_wall_s"]) == set(adaptive.ATTACKS)
    for key in [*names, "carso_adaptive", "carso_randaa"]:
        assert adv[key].shape == x.shape and (adv[key] - x).abs().max() <= s.eps + 1e-6, key
    for surface in ("dexp", "dexp-logsum"):
        for point in ("clean", "adversarial"):
            assert len(out[f"saturation_{surface}_{point}"]) == 6


# --------------------------------------------------------------------------------------------------
# The test that can fail: scaled logits saturate the paper's surface
# --------------------------------------------------------------------------------------------------

SCALE = 20.0
# 16 examples, 6 steps, 2 EoT: the adaptive evaluation's attacks, and PGD+EoT on the paper's surface.
SCALED = [
    "--target",
    "carso",
    "--n-examples",
    "16",
    "--batch-size",
    "16",
    "--samples",
    "4",
    "--steps",
    "6",
    "--eot",
    "2",
    "--repeats",
    "2",
    "--device",
    "cpu",
    "--no-indicators",
]  # indicators: test_indicators.py


@pytest.fixture(scope="module")
def scaled_run(trained_smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained smoke run with its classifier's logits × 20 (as strong adversarial training produces):
    the purifier's conditioning (block convolutions) is unchanged, the aggregation's input is scaled."""
    loaded = load_run(trained_smoke_run)
    with torch.no_grad():
        loaded.classifier.logits.weight.mul_(SCALE)
        loaded.classifier.logits.bias.mul_(SCALE)
    return write_run(tmp_path_factory.mktemp("scaled") / "run", loaded.cfg, loaded.classifier, loaded.purifier)


def _results(run: Path, name: str) -> dict:
    return json.loads((run / "eval" / name / "results.json").read_text())


@pytest.mark.slow
def test_scaled_logits_fool_the_paper_protocol_not_the_adaptive_one(scaled_run: Path) -> None:
    result = runner.invoke(app, ["eval", "--run", str(scaled_run), *SCALED, "--attack", "pgd-eot"])
    assert result.exit_code == 0, result.output
    pgd = _results(scaled_run, "pgd-eot")
    # The diagnostic sees it even when the user ran the paper-surface attack, and names the remedy.
    sat = pgd["saturation"]["surfaces"]
    assert "dexp" in pgd["saturation"]["flagged"]
    # More saturated than logsum (whose CE also degrades at ×20 margins on some reseeded models).
    assert sat["dexp"]["clean"]["fraction"] > sat["dexp-logsum"]["clean"]["fraction"], sat
    text = " ".join(result.output.split())
    assert "warning: the cross-entropy gradient is numerically useless" in text and "--attack adaptive" in text

    # The paper's full protocol: randAA (APGD-CE and the scale-free APGD-DLR, EoT) on the surface the
    # authors' AutoAttack saw.
    result = runner.invoke(app, ["eval", "--run", str(scaled_run), *SCALED, "--attack", "autoattack"])
    assert result.exit_code == 0, result.output
    paper = _results(scaled_run, "autoattack")

    result = runner.invoke(app, ["eval", "--run", str(scaled_run), *SCALED])  # the default: adaptive
    assert result.exit_code == 0, result.output
    r = _results(scaled_run, "adaptive")
    assert r["settings"]["attack"] == "adaptive"
    assert "dexp" in r["saturation"]["flagged"]
    sat = r["saturation"]["surfaces"]
    assert sat["dexp"]["clean"]["fraction"] > sat["dexp-logsum"]["clean"]["fraction"], sat
    clean = r["metrics"]["C/Cl"]["correct"]
    assert clean == pgd["metrics"]["C/Cl"]["correct"] == paper["metrics"]["C/Cl"]["correct"]  # same clean draws
    assert r["flags"]["carso_randaa"] == paper["flags"]["carso_randaa"]  # the paper's protocol inside, unchanged
    worst = r["adaptive"]["worst_case"]["correct"]
    randaa = paper["metrics"]["C/randAA"]["correct"]
    pgd_dexp = pgd["metrics"]["PGD+EoT"]["correct"]
    rows = {a["attack"]: a for a in r["adaptive"]["attacks"]}
    later = sum(a["broken_first"] for name, a in rows.items() if name != "randaa")
    print(
        f"clean {clean}, PGD+EoT(dexp) {pgd_dexp}, randAA(paper) {randaa}, adaptive {worst}; broken first: "
        + ", ".join(f"{n} {a['broken_first']}" for n, a in rows.items())
    )
    # The worst case is clearly below both the cross-entropy attack on the paper's surface and the paper's
    # full protocol, and the examples the paper's protocol left were broken by the attacks that do not
    # rest on the saturated surface.
    assert worst <= pgd_dexp / 2 and pgd_dexp - worst >= 3, (worst, pgd_dexp)
    assert worst <= randaa - 3 and later >= 3, (worst, randaa, later)
    assert rows["randaa"]["robust_after"] <= sum(
        a & c for a, c in zip(paper["flags"]["carso_randaa"], r["flags"]["carso_clean"])
    )


def test_sanity_fails_on_saturated_logits_and_names_the_remedy(
    scaled_run: Path, trained_smoke_run: Path, tmp_path: Path
) -> None:
    fast = ["--n-examples", "16", "--batch-size", "16", "--samples", "4", "--checks", "saturation", "--device", "cpu"]
    out = tmp_path / "scaled.json"
    result = runner.invoke(app, ["sanity", "--run", str(scaled_run), *fast, "--out", str(out)])
    assert "--attack adaptive" in " ".join(result.output.split())
    (check,) = json.loads(out.read_text())["checks"]
    frac = check["details"]["fraction"]
    assert frac["dexp"] > 0.1 and frac["dexp"] > frac["dexp-logsum"], frac
    # A failure when logsum is healthy; a warning where the ×20 margins degrade logsum's CE too (measured
    # on a reseeded smoke model, CARSO_SMOKE_SEED=1: dexp 37.5 %, dexp-logsum 18.8 %).
    assert check["status"] == ("fail" if frac["dexp-logsum"] <= 0.1 else "warn")
    assert result.exit_code == (1 if check["status"] == "fail" else 0), result.output
    # The same check on the model as trained: no alarm (with a margin: 5 of 16 examples, see test_sanity).
    result = runner.invoke(
        app, ["sanity", "--run", str(trained_smoke_run), *fast, "--out", str(out), "--saturation-threshold", "0.3"]
    )
    assert result.exit_code == 0, result.output
    (check,) = json.loads(out.read_text())["checks"]
    assert check["status"] == "pass" and check["details"]["fraction"]["dexp"] <= 0.3
