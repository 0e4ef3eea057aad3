"""The two recipes (docs/FIDELITY.md): the paper's text (presets cifar10, cifar100, tinyimagenet) and the
authors' code (``*-code``, children of the paper presets): inheritance, the ε conversion, both LR
schedules, the adversarial counts, ``carso info --json/--diff``, and a real training with each recipe."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from carso_cli import checkpoint as ckpt
from carso_cli import recipes as info
from carso_cli import training as tr
from carso_cli.cli import app
from carso_cli.config import load_config, parse_override, resolved_lrs
from carso_cli.errors import ConfigError
from carso_cli.models import build_classifier

runner = CliRunner()
SCENARIOS = ("cifar10", "cifar100", "tinyimagenet")
FIDELITY = Path(__file__).resolve().parent.parent / "docs" / "FIDELITY.md"


def info_json(*args: str) -> dict:
    result = runner.invoke(app, ["info", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# -- inheritance ------------------------------------------------------------------------------------


def test_child_preset_equals_parent_with_set(tmp_path: Path) -> None:
    child = tmp_path / "child.toml"
    child.write_text('extends = "cifar10"\nname = "child"\n[training]\nschedule = "code"\n')
    got = load_config(child)
    want = load_config("cifar10", {"training.schedule": "code", "name": "child"})
    assert got == want
    assert load_config("cifar10").training.schedule == "paper"


def test_inheritance_errors(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"inheritance cycle \(a → b → a\)"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "orphan.toml").write_text('extends = "no-such-preset"\n')
    result = runner.invoke(app, ["info", "--preset", str(tmp_path / "orphan.toml"), "--json"])
    assert result.exit_code != 0 and "extends 'no-such-preset', which is no preset" in result.output
    assert "Traceback" not in result.output


def test_code_presets_are_short_children() -> None:
    for name in SCENARIOS:
        text = (FIDELITY.parent.parent / "presets" / f"{name}-code.toml").read_text()
        assert f'extends = "{name}"' in text and "[purifier]" not in text and "batch_size" not in text


# -- ε of the training attacks -------------------------------------------------------------------


@pytest.mark.parametrize(("name", "factor"), [("cifar10", 3.99), ("cifar100", 3.75), ("tinyimagenet", 4.39)])
def test_code_eps_is_the_normalised_eps_in_pixels(name: str, factor: float) -> None:
    std = load_config(name).data.std
    attacks = info.derived(load_config(f"{name}-code"))["train_attacks"]
    paper = info.derived(load_config(name))["train_attacks"]
    stated = [4 / 255, 8 / 255]  # ε/2 and ε (Table 14)
    for a, p in zip(attacks, paper):
        eps = stated[0] if a["group"].endswith("/2") else stated[1]
        assert abs(a["eps_pixel"] - eps * 3 / sum(std)) < 1e-9
        assert abs(p["eps_pixel"] - eps) < 1e-12
    assert round(3 / sum(std), 2) == factor


# -- LR schedules ---------------------------------------------------------------------------------


def authors_schedule(init: float, steady: float, final: float, epochs: int) -> list[float]:
    """The LR of each epoch as ebtorch ``warmed_up_linneal`` builds it and the training scripts step it."""
    eup, efl = int(0.125 * epochs), int(0.125 * epochs)
    ean = epochs - eup - efl
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=steady)
    milestones = [max(3, eup), max(3, eup) + max(1, efl)]
    warm = torch.optim.lr_scheduler.LinearLR(opt, init / steady, 1.0, total_iters=milestones[0])
    flat = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=milestones[1])
    anneal = torch.optim.lr_scheduler.LinearLR(opt, 1.0, final / steady, total_iters=max(3, ean))
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, flat, anneal], milestones=milestones)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize(("name", "per_process"), [("cifar10", 640), ("cifar100", 640), ("tinyimagenet", 128)])
def test_code_schedule_is_torchs_sequential_lr(name: str, per_process: int) -> None:
    lrs = info_json("--preset", f"{name}-code")["derived"]["lr_per_epoch"]
    want = authors_schedule(5e-9, 1e-4 * per_process, 1.25e-8 * per_process, len(lrs))
    assert len(lrs) == (250 if name == "tinyimagenet" else 200)
    for e, (got, ref) in enumerate(zip(lrs, want)):
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-15), e


def test_table16_final_lr() -> None:
    # Table 16's final LR is the code schedule's LR at the run's last-but-one epoch …
    code_a = [tr.lr_at_epoch(load_config(n).training, 199) for n in ("cifar10-code", "cifar100-code")]
    assert code_a == pytest.approx([4.346e-4] * 2, abs=5e-8)
    assert tr.lr_at_epoch(load_config("tinyimagenet-code").training, 248) == pytest.approx(1.378e-4, abs=5e-8)
    # … and the paper recipe's at its last epoch (warm-up start and plateau as Table 16 gives them).
    t = load_config("cifar10").training
    assert [tr.lr_at_epoch(t, e) for e in (0, 25, 49)] == pytest.approx([5e-9, 0.064, 0.064])
    assert tr.lr_at_epoch(t, 199) == pytest.approx(4.346e-4, rel=1e-12)
    assert tr.lr_at_epoch(load_config("tinyimagenet").training, 249) == pytest.approx(1.378e-4, rel=1e-12)
    # β: the same in both recipes (make_beta_scheduler: lag ceil(0.125·E), warm-up ceil(0.125·E/3)).
    for name in SCENARIOS:
        assert (
            info.derived(load_config(name))["beta_per_epoch"]
            == info.derived(load_config(f"{name}-code"))["beta_per_epoch"]
        )


# -- adversarial examples per batch ---------------------------------------------------------------


def test_adversarial_counts() -> None:
    assert info_json("--preset", "tinyimagenet-code", "--gpus", "8")["derived"]["adversarial_per_attack"] == [0] * 4
    assert info_json("--preset", "tinyimagenet-code")["derived"]["adversarial_per_attack"] == [0] * 4
    assert min(info_json("--preset", "tinyimagenet")["derived"]["adversarial_per_attack"]) >= 2
    # (a) and (b): the code's per-process count gives the paper's totals (2560 and 384 examples).
    for name, total in (("cifar10", 2560), ("cifar100", 384)):
        for preset in (name, f"{name}-code"):
            t = load_config(preset).training
            n = tr.adversarial_count(t.batch_size, t.adversarial_fraction, t.adversarial_count, t.reference_world_size)
            assert n == total, preset
    assert tr.adversarial_count(1024, 0.01, "per-process", 8) == 0
    assert tr.adversarial_count(1024, 0.01, "per-process", 1) == 8  # 10.24 // 4 = 2 per attack
    assert tr.adversarial_count(1024, 0.01, "global", 8) == 10


# -- carso info --diff and docs/FIDELITY.md --------------------------------------------------------


def test_info_diff_and_fidelity_agree() -> None:
    result = runner.invoke(app, ["info", "--preset", "cifar10", "--diff", "cifar10-code", "--json"])
    assert result.exit_code == 0, result.output
    differing = json.loads(result.output)
    assert differing["attacks.train_eps_space"] == ["pixel", "normalised"]
    assert differing["training.adversarial_count"] == ["global", "per-process"]
    for name in ("cifar100", "tinyimagenet"):
        keys = {k for k, _, _ in info.diff(load_config(name), load_config(f"{name}-code"))}
        assert keys == set(differing), name
    table = FIDELITY.read_text(encoding="utf-8")
    documented = set(re.findall(r"`((?:data|training|attacks)\.[a-z_0-9]+)", table))
    assert set(differing) <= documented, set(differing) - documented
    # Every key FIDELITY.md names is a real one (a renamed key would leave the document wrong).
    known = set(info.flat_keys(load_config("cifar10")))
    assert documented <= known, documented - known
    plain = runner.invoke(app, ["info", "--preset", "cifar10", "--diff", "cifar10-code"])
    assert plain.exit_code == 0 and "training.schedule" in plain.output and "10 resolved keys differ" in plain.output


# -- both recipes train through the CLI ------------------------------------------------------------

SMALL = [  # the cifar10 presets at smoke sizes: 40 synthetic examples, batches of 16 (2 full + 8 left over)
    "data.dataset=synthetic",
    "data.synthetic_train_size=40",
    "data.num_workers=0",
    "classifier.depth=10",
    "classifier.width=1",
    "purifier.layers=rule:block-convs",
    "purifier.fcrepr=64",
    "purifier.fjoint=16",
    "purifier.decoder_channels=[32, 32, 16, 16, 8]",
    "training.batch_size=16",
    "training.epochs=1",
    "training.warmup_epochs=1",
    "training.plateau_epochs=1",
    "training.annealing_epochs=1",
    "training.beta_start_epoch=0",
    "training.beta_end_epoch=1",
    "training.initial_lr=1e-4",
    "attacks.pgd_steps=1",
    "training.lookahead_k=2",
]


@pytest.mark.slow
def test_both_recipes_train(tmp_path: Path) -> None:
    cls = tmp_path / "classifier.safetensors"
    torch.manual_seed(0)
    ckpt.save_tensors(cls, build_classifier(load_config("smoke")).state_dict())
    sets = [a for s in SMALL for a in ("--set", s)]
    runs = {}
    for preset, extra in (("cifar10", []), ("cifar10-code", ["--set", "training.reference_world_size=2"])):
        out = tmp_path / preset
        result = runner.invoke(
            app,
            [
                "train-purifier",
                "--preset",
                preset,
                "--classifier",
                str(cls),
                "--out",
                str(out),
                "--device",
                "cpu",
                *sets,
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        runs[preset] = (load_config(out / ckpt.CONFIG_FILE), tr.read_metrics(out / ckpt.METRICS_FILE))
    (paper, paper_metrics), (code, code_metrics) = runs["cifar10"], runs["cifar10-code"]
    # config.toml records each recipe fully resolved (it loads back without the preset files).
    assert paper.training.schedule == "paper" and code.training.schedule == "code"
    assert code.attacks.train_eps_space == "normalised" and not code.data.augment
    assert [r["batches"] for r in paper_metrics] == [2]  # the last 8 examples dropped
    assert [r["batches"] for r in code_metrics] == [3]  # kept (drop_last = false)
    # The code recipe's LRs: per example × the per-process batch (16 / 2); its warm-up lasts max(3, W) epochs.
    t = code.training
    assert resolved_lrs(t) == pytest.approx((1e-4 * 8, 1.25e-8 * 8))
    assert tr.lr_at_epoch(t, 1) == pytest.approx(1e-4 + (8e-4 - 1e-4) / 3)
    assert code_metrics[0]["lr"] == pytest.approx(1e-4)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in paper_metrics + code_metrics)


def test_overrides_reach_the_recipe_keys() -> None:
    cfg = load_config(
        "smoke",
        dict(
            parse_override(s)
            for s in (
                "training.schedule=code",
                "attacks.train_eps_space=normalised",
                "training.adversarial_count=per-process",
            )
        ),
    )
    assert info.derived(cfg)["train_attacks"][3]["eps_pixel"] == pytest.approx(8 / 255 * 3 / 0.75)
    for bad in ("training.schedule=cosine", "attacks.train_eps_space=latent", "training.adversarial_count=some"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("smoke", dict([parse_override(bad)]))


def test_last_partial_batch_kept_or_dropped() -> None:
    dropped = tr.epoch_batches(40, 16, seed=3, epoch=1)
    kept = tr.epoch_batches(40, 16, seed=3, epoch=1, drop_last=False)
    assert [len(b) for b in dropped] == [16, 16] and [len(b) for b in kept] == [16, 16, 8]
    assert all(torch.equal(a, b) for a, b in zip(dropped, kept))  # the same order, one batch more
    assert sorted(torch.cat(kept).tolist()) == list(range(40))
    assert len(tr.epoch_batches(40, 16, 3, 1, drop_last=False, min_last=9)) == 2  # fewer than one per process
