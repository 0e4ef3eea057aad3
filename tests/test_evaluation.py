"""Evaluation machinery: per-example seeding, AutoAttack wrapper, gradient checks, results store, logging."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from rich.console import Console

from carso_cli import evaluation as ev
from carso_cli.errors import CarsoError
from carso_cli.models import CARSO, build_classifier, build_purifier, set_eval_frozen


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    from carso_cli.config import load_config

    cfg = load_config("smoke")
    torch.manual_seed(0)
    classifier = build_classifier(cfg).eval()
    purifier = build_purifier(cfg, classifier, inference_only=True).eval()
    set_eval_frozen(classifier, purifier)
    return classifier, purifier


def _carso(models, samples: int = 2, aggregation: str = "dexp") -> CARSO:
    return CARSO(models[0], models[1], samples=samples, aggregation=aggregation)


def test_seeded_sampler_is_per_example() -> None:
    a = ev.ExampleSeededSampler(seed=1, stream=0).bind([3, 4, 5])
    b = ev.ExampleSeededSampler(seed=1, stream=0).bind([5])
    za1, za2 = a(4, 3, 6, torch.device("cpu"), torch.float32), a(4, 3, 6, torch.device("cpu"), torch.float32)
    zb1, zb2 = b(4, 1, 6, torch.device("cpu"), torch.float32), b(4, 1, 6, torch.device("cpu"), torch.float32)
    assert za1.shape == (4, 3, 6)
    assert torch.equal(za1[:, 2], zb1[:, 0]) and torch.equal(za2[:, 2], zb2[:, 0])  # batch does not matter
    assert not torch.equal(za1, za2)  # a new call draws anew
    other = ev.ExampleSeededSampler(seed=1, stream=1).bind([5])(4, 1, 6, torch.device("cpu"), torch.float32)
    assert not torch.equal(other, zb1)  # streams are independent
    stacked = ev.ExampleSeededSampler(seed=1, stream=0).bind([3, 4, 5])(4, 6, 6, torch.device("cpu"), torch.float32)
    assert torch.equal(stacked[:, :3], za1) and not torch.equal(stacked[:, 3:], za1)  # EoT copies differ
    with pytest.raises(RuntimeError):
        a(4, 4, 6, torch.device("cpu"), torch.float32)


def test_draws_do_not_depend_on_batching(models) -> None:
    carso = _carso(models, samples=3)
    x = torch.rand(6, 3, 32, 32)

    def scores(parts: list[range]) -> torch.Tensor:
        out = []
        for idx in parts:
            sampler = ev.ExampleSeededSampler(7, ev.STREAM_CLEAN).bind(idx)
            with ev.seeded_latents(carso, sampler), torch.no_grad():
                out.append(carso(x[idx.start : idx.stop]))
        return torch.cat(out)

    whole, split = scores([range(6)]), scores([range(2), range(2, 5), range(5, 6)])
    torch.testing.assert_close(whole, split, rtol=1e-4, atol=1e-4)
    assert carso.latent_sampler is not None and not isinstance(carso.latent_sampler, ev.ExampleSeededSampler)


def test_autoattack_wrapper_eps_ball_and_extremes(models) -> None:
    classifier = models[0]
    x = torch.rand(6, 3, 32, 32)
    y = classifier(x).argmax(1)  # every example starts correct
    cpu = torch.device("cpu")
    none = ev.autoattack_flags(
        classifier, x, y, eps=0.0, version="custom", attacks=["apgd-ce"], seed=0, device=cpu, steps=3
    )
    assert none.flags.all()
    # The standard version (APGD-CE, APGD-T, FAB-T, Square): at ε = 1 every input can become any image,
    # so APGD-CE breaks everything and the library skips the rest.
    full = ev.autoattack_flags(
        classifier, x, y, eps=1.0, version="standard", seed=0, device=cpu, steps=3, square_queries=5
    )
    assert not full.flags.any()
    some = ev.autoattack_flags(
        classifier, x, y, eps=4 / 255, version="custom", attacks=["apgd-ce"], seed=0, device=cpu, steps=3
    )
    assert (some.x_adv - x).abs().max() <= 4 / 255 + 1e-6
    assert torch.equal(some.flags, classifier(some.x_adv).argmax(1) == y)


def test_randaa_keeps_candidates_and_eot(models) -> None:
    carso = _carso(models, samples=2)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        y = carso(x).argmax(1)
    aa = ev.make_autoattack(carso, eps=0.1, version="rand", seed=0, device=torch.device("cpu"), steps=7, eot=3)
    assert aa.apgd.eot_iter == 3 and aa.apgd.n_iter == 7 and aa.device == torch.device("cpu")
    assert aa.attacks_to_run == ["apgd-ce", "apgd-dlr"]
    res = ev.autoattack_flags(carso, x, y, eps=0.1, version="rand", seed=0, device=torch.device("cpu"), steps=3, eot=1)
    # One point per sub-attack (issue 23), each in the ball; where the library's verdict broke an example,
    # its adversarial example is one of them (the point of the sub-attack that fooled its draw).
    assert res.sources == ["apgd-ce", "apgd-dlr"] and res.candidates.shape == (2, *x.shape)
    assert (res.candidates - x).abs().max() <= 0.1 + 1e-6
    broken = ~res.flags
    same = (res.candidates == res.x_adv[None]).flatten(2).all(dim=2)  # (K, B)
    assert same[:, broken].any(dim=0).all()
    assert torch.equal(res.point[broken], res.x_adv[broken]) and torch.equal(
        res.point[~broken], res.candidates[0, ~broken]
    )


def test_apgd_iterations_match_the_library() -> None:
    from pyautoattack.autopgd_base import APGDAttack

    ref = APGDAttack(lambda x: x, n_iter=20, eps=0.1)
    mine = APGDAttack(lambda x: x, n_iter=100, eps=0.1)
    ev._set_apgd_iterations(mine, 20)
    for name in ("n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr"):
        assert getattr(mine, name) == getattr(ref, name), name


def test_dlr_loss_matches_the_library() -> None:
    from pyautoattack.autopgd_base import APGDAttack

    scores, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    y[0] = scores[0].argmax()  # the top class is the label for some examples
    ref = APGDAttack(lambda x: x, eps=0.1).dlr_loss(scores, y)
    torch.testing.assert_close(ev.dlr_loss(scores, y), ref)


def test_gradient_health_vote_vs_dexp(models) -> None:
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    vote = ev.gradient_health(_carso(models, 2, "vote"), x, y, range(4), draws=2, seed=0)
    assert vote.bad_entry_fraction == 1.0 and vote.bad_gradient_fraction == 1.0 and vote.gradients == 8
    dexp = ev.gradient_health(_carso(models, 2, "dexp"), x, y, range(4), draws=2, seed=0)
    assert dexp.bad_gradient_fraction == 0.0 and dexp.bad_entry_fraction < 0.01
    total = vote + dexp
    assert total.gradients == 16 and total.to_json()["bad_gradient_fraction"] == 0.5


def test_eot_agreement_is_one_for_a_deterministic_model(models) -> None:
    x, y = torch.rand(3, 3, 32, 32), torch.randint(0, 10, (3,))
    cos = ev.eot_agreement(_carso(models, samples=0), x, y, range(3), eot=2, seed=0)  # z = 0: deterministic
    torch.testing.assert_close(cos, torch.ones(3), atol=1e-5, rtol=0)
    noisy = ev.eot_agreement(_carso(models, samples=2), x, y, range(3), eot=1, seed=0)
    assert (noisy < 1 - 1e-6).all() and (noisy > -1).all()


def test_results_store_resume_and_mismatch(tmp_path: Path) -> None:
    settings = ev.EvalSettings(n_examples=4, batch_size=2).to_json()
    store = ev.ResultsStore(tmp_path / "e", settings, resume=False)
    store.prepare()
    record = {"batch": 0, "start": 0, "stop": 2, "settings": settings, "flags": {"carso_clean": [1, 0]}}
    store.save(0, record)
    assert store.load(0) is None  # without resume nothing is reused
    again = ev.ResultsStore(tmp_path / "e", settings, resume=True)
    again.check()
    assert again.load(0) == record and again.load(1) is None
    other = ev.ResultsStore(tmp_path / "e", {**settings, "eps": 0.5}, resume=True)
    with pytest.raises(CarsoError, match="other settings.*--name"):
        other.check()
    fresh = ev.ResultsStore(tmp_path / "e", {**settings, "eps": 0.5}, resume=False)
    fresh.prepare()  # without --resume, earlier results are cleared
    assert not (tmp_path / "e" / "batch-00000.json").exists()


def test_merge_and_summary() -> None:
    records = [
        {"start": 2, "flags": {"carso_clean": [1, 1], "carso_clean_repeats": [[1, 0], [1, 1]], "warnings": []}},
        {"start": 0, "flags": {"carso_clean": [0, 1], "carso_clean_repeats": [[1, 1], [0, 1]], "warnings": []}},
    ]
    flags = ev.merge_records(records)
    assert flags["carso_clean"] == [0, 1, 1, 1]
    assert flags["carso_clean_repeats"] == [[1, 1, 1, 0], [0, 1, 1, 1]]
    metrics, report = ev.summarize(flags)
    assert metrics["C/Cl"] == {"key": "carso_clean", "correct": 3, "total": 4, "accuracy": 0.75}
    clean = report["clean"]
    assert clean["mean"] == 0.75 and clean["worst"] == 0.5 and clean["repeats"] == 2  # examples 1 and 2
    assert clean["worst"] <= min(clean["single"], clean["mean"])


def test_dumps_compact_round_trips() -> None:
    obj = {"a": [1, 0, 1], "b": {"c": [[1, 2], [3]], "d": "x"}, "e": [], "f": 0.1}
    text = ev.dumps_compact(obj)
    assert json.loads(text) == obj
    assert '"a": [1, 0, 1]' in text


def test_library_log_goes_through_rich() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=200)
    logger = logging.getLogger(ev.AUTOATTACK_LOGGER)
    before = (logger.level, logger.propagate, list(logger.handlers))
    with ev.library_logging(console):
        logger.debug("apgd-ce - 1/1 - 3 out of 8 successfully perturbed")
        logger.warning("there are 2 points with zero gradient!")
    logger.debug("after the context: not shown")
    text = buffer.getvalue()
    assert "auto-attack: apgd-ce - 1/1 - 3 out of 8" in text
    assert "warning: there are 2 points with zero gradient!" in text
    assert "not shown" not in text
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_settings_validation() -> None:
    with pytest.raises(CarsoError, match="unknown attack"):
        ev.EvalSettings(attack="fgsm").validate()
    with pytest.raises(CarsoError, match="eps"):
        ev.EvalSettings(eps=1.5).validate()
    with pytest.raises(CarsoError, match="repeats"):
        ev.EvalSettings(repeats=0).validate()
    assert ev.batch_ranges(5, 2) == [range(2), range(2, 4), range(4, 5)]
    assert ev.format_duration(30) == "30 s" and ev.format_duration(7200) == "2.0 h"


def test_one_settings_path_preset_fallbacks_and_ranges() -> None:
    """eval and sanity share the AttackBudget names; an option left None takes the preset's value, once."""
    from carso_cli.config import load_config
    from carso_cli.evaluation.checks import SanitySettings

    cfg = load_config("smoke")
    a = cfg.attacks
    e = ev.EvalSettings.from_options(cfg, targets=["classifier", "carso"])
    assert (e.eps, e.samples, e.aggregation) == (a.eps, cfg.inference.samples, cfg.inference.aggregation)
    assert (e.aa_eot, e.pgd_steps, e.pgd_eot, e.pgd_step_size) == (
        a.randaa_eot_iterations,
        a.pgd_eot_steps,
        a.pgd_eot_iterations,
        a.pgd_eot_step_size,
    )
    assert e.attack == "adaptive" and e.indicators  # the default whenever CARSO is evaluated
    assert ev.EvalSettings.from_options(cfg, targets=["classifier"]).attack == "autoattack"
    assert not ev.EvalSettings.from_options(cfg, attack="pgd-eot").indicators
    s = SanitySettings.from_options(cfg)
    assert s.pgd_steps == min(a.pgd_eot_steps, 20) and s.pgd_eot == min(a.pgd_eot_iterations, 5)
    assert s.large_eps == a.sanity_eps and s.eps == a.eps
    given = SanitySettings.from_options(cfg, eps=0.5, pgd_steps=3, square_queries=7)
    assert (given.eps, given.pgd_steps, given.square_queries) == (0.5, 3, 7)
    for cls in (ev.EvalSettings, SanitySettings):  # one range check for both
        with pytest.raises(CarsoError, match="eps must lie in"):
            cls.from_options(cfg, eps=1.5)
        with pytest.raises(CarsoError, match="batch-size must be at least 1"):
            cls.from_options(cfg, batch_size=0)


def test_the_checks_are_a_registry_reachable_from_python() -> None:
    from carso_cli.evaluation import checks

    assert list(checks.CHECKS) == [
        "large-eps",
        "gradients",
        "monotonic",
        "eot",
        "blackbox",
        "saturation",
        "indicators",
    ]
    called: list[str] = []
    fake = {name: (lambda _inputs, n=name: called.append(n) or n) for name in checks.CHECKS}
    original = dict(checks.CHECKS)
    try:
        checks.CHECKS.update(fake)
        assert checks.run_checks(None, ["saturation", "gradients"]) == ["gradients", "saturation"]  # registry order
    finally:
        checks.CHECKS.update(original)
    assert called == ["gradients", "saturation"]
