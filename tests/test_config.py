"""Presets: loading by name and path, overrides, refusal of unknown keys and wrong types."""

from __future__ import annotations

from pathlib import Path

import pytest

from carso_cli.config import (
    Config,
    config_to_toml,
    list_presets,
    load_config,
    parse_eps,
    parse_override,
)
from carso_cli.errors import ConfigError

TABLE7 = [
    *(f"layer.0.block.{b}.conv_{k}" for b in range(4) for k in (0, 1)),
    "layer.1.block.0.conv_0",
    "layer.1.block.0.conv_1",
    "layer.1.block.0.shortcut",
    *(f"layer.1.block.{b}.conv_{k}" for b in range(1, 4) for k in (0, 1)),
    "layer.2.block.0.conv_0",
    "layer.2.block.0.conv_1",
    "layer.2.block.0.shortcut",
    *(f"layer.2.block.{b}.conv_{k}" for b in range(1, 4) for k in (0, 1)),
]


def test_all_presets_load() -> None:
    assert {"cifar10", "cifar100", "tinyimagenet", "smoke"} <= set(list_presets())
    for name in list_presets():
        assert isinstance(load_config(name), Config)


@pytest.mark.parametrize(
    "name, size, classes, fcrepr, fjoint, depth, decoder, epochs, bs, frac, plateau_lr, final_lr, beta",
    [
        ("cifar10", 32, 10, 512, 128, 3, "32x32", 200, 5120, 0.5, 0.064, 4.346e-4, (25, 34)),
        ("cifar100", 32, 100, 512, 128, 3, "32x32", 200, 2560, 0.15, 0.064, 4.346e-4, (25, 34)),
        ("tinyimagenet", 64, 200, 768, 192, 4, "64x64", 250, 1024, 0.01, 0.0128, 1.378e-4, (32, 43)),
    ],
)
def test_paper_presets_hold_the_tables(
    name, size, classes, fcrepr, fjoint, depth, decoder, epochs, bs, frac, plateau_lr, final_lr, beta
) -> None:
    cfg = load_config(name)
    assert cfg.data.dataset == name and cfg.data.image_size == size and cfg.data.num_classes == classes
    assert (cfg.classifier.depth, cfg.classifier.width, cfg.classifier.activation) == (28, 10, "silu")
    assert cfg.purifier.layers == TABLE7  # Table 7, same for all three scenarios
    assert (cfg.purifier.fcrepr, cfg.purifier.fjoint) == (fcrepr, fjoint)  # Table 15
    assert cfg.purifier.layerwise_depth == depth and cfg.purifier.decoder == decoder
    t = cfg.training  # Table 16
    assert (t.epochs, t.batch_size, t.adversarial_fraction) == (epochs, bs, frac)
    assert t.warmup_epochs + t.plateau_epochs + t.annealing_epochs == t.epochs
    assert (t.initial_lr, t.plateau_lr, t.final_lr) == (5e-9, plateau_lr, final_lr)
    assert (t.beta_start_epoch, t.beta_end_epoch) == beta
    assert (t.lookahead_k, t.lookahead_alpha, t.radam_beta1, t.radam_beta2, t.radam_eps) == (6, 0.8, 0.9, 0.999, 1e-8)
    a = cfg.attacks  # Table 14
    assert a.eps == pytest.approx(8 / 255)
    assert a.fgsm_eps == pytest.approx([4 / 255, 8 / 255]) and a.pgd_eps == pytest.approx([4 / 255, 8 / 255])
    assert (a.pgd_steps, a.pgd_step_size, a.pgd_random_start) == (40, 0.01, True)
    assert (a.pgd_eot_steps, a.pgd_eot_step_size, a.pgd_eot_iterations, a.randaa_eot_iterations) == (200, 0.007, 20, 20)
    assert cfg.inference.samples == 8 and cfg.inference.aggregation == "dexp"


def test_normalisation_constants_of_the_published_weights() -> None:
    assert load_config("cifar10").data.mean == [0.4914, 0.4822, 0.4465]
    assert load_config("cifar10").data.std == [0.2471, 0.2435, 0.2616]
    assert load_config("cifar100").data.std == [0.2673, 0.2564, 0.2762]
    assert load_config("tinyimagenet").data.mean == [0.4802, 0.4481, 0.3975]


def test_preset_by_path_and_roundtrip(tmp_path: Path) -> None:
    cfg = load_config("cifar100")
    path = tmp_path / "mine.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg
    assert load_config(str(path)) == cfg


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "presets" / "smoke.toml").read_text()
    path = tmp_path / "typo.toml"
    path.write_text(text.replace("adversarial_fraction", "adversarial_fracton"))
    with pytest.raises(ConfigError, match=r"typo\.toml.*training\.adversarial_fracton"):
        load_config(path)
    path.write_text(text + "\n[trainign]\nepochs = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'trainign'"):
        load_config(path)


def test_wrong_type_is_an_error(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "presets" / "smoke.toml").read_text()
    path = tmp_path / "bad.toml"
    path.write_text(text.replace("epochs = 6", 'epochs = "six"'))
    with pytest.raises(ConfigError, match=r"bad\.toml.*training\.epochs.*integer"):
        load_config(path)
    path.write_text(text.replace("augment = false", "augment = 1"))
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(path)


def test_eps_as_fraction_or_float() -> None:
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps(0.5) == 0.5
    for bad in ("abc", "1/0", 1.5, -0.1, True):
        with pytest.raises(ConfigError):
            parse_eps(bad)


def test_overrides() -> None:
    cfg = load_config("smoke", {"training.epochs": 2, "attacks.eps": "16/255"})
    assert cfg.training.epochs == 2 and cfg.attacks.eps == pytest.approx(16 / 255)
    assert parse_override("training.batch_size=64") == ("training.batch_size", 64)
    assert parse_override("inference.aggregation=vote") == ("inference.aggregation", "vote")
    with pytest.raises(ConfigError, match="unknown key 'training.epoch'"):
        load_config("smoke", {"training.epoch": 2})
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config("smoke", {"training.epochs": "many"})
    with pytest.raises(ConfigError, match="aggregation"):
        load_config("smoke", {"inference.aggregation": "median"})


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(ConfigError, match="available: .*cifar10"):
        load_config("cifar11")
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/preset.toml")


@pytest.mark.parametrize("section", ["training", "classifier_training"])
@pytest.mark.parametrize("key", ["micro_batch", "attack_chunk"])
@pytest.mark.parametrize("value", ["-3", '"lots"'])
def test_memory_bounds_of_a_preset_are_checked_naming_the_key(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    """Issue 19: a typo in a preset's memory bound is reported against the preset key, when the preset is
    read (not later as a bad ``--micro-batch``, an option the user never typed)."""
    path = tmp_path / "typo.toml"
    path.write_text(f'extends = "smoke"\n[{section}]\n{key} = {value}\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"'{section}.{key}'" in message and str(path) in message and "--" not in message
    for good in ("0", "16", '"auto"'):  # the whole batch, a count, from free memory
        path.write_text(f'extends = "smoke"\n[{section}]\n{key} = {good}\n')
        assert getattr(getattr(load_config(path), section), key) == (
            16 if good == "16" else "auto" if "auto" in good else 0
        )


@pytest.mark.parametrize(
    "override",
    [
        "training.warmup_epochs=-1",
        "training.initial_lr=-0.1",
        "training.lookahead_k=0",
        "training.lookahead_alpha=1.5",
        "training.radam_beta1=1.0",
        "training.radam_eps=0",
        "training.weight_decay=-1",
        "training.checkpoint_every=0",
        "classifier_training.epochs=0",
        "classifier_training.batch_size=0",
        "classifier_training.lr=0",
        "classifier_training.momentum=1.5",
        "classifier_training.pgd_steps=0",
        "classifier_training.pgd_step_size=2",
        "attacks.pgd_steps=0",
        "data.num_workers=-1",
        "data.image_size=0",
        "data.crop_padding=-1",
        "purifier.fcrepr=0",
        "purifier.leaky_slope=-0.5",
        "inference.samples=-1",
    ],
)
def test_every_bound_is_checked_naming_the_key(override: str) -> None:
    """``config.validate`` checks the bounds of every numeric key, not only a few (issue 19)."""
    key, value = parse_override(override)
    with pytest.raises(ConfigError) as err:
        load_config("smoke", {key: value})
    assert f"'{key}'" in str(err.value)


def test_options_reach_the_config_as_parsed_overrides() -> None:
    """``--attack-chunk`` / ``--micro-batch`` are parsed once, into overrides beside ``--set`` and the options
    that stand for a key; the config holds the parsed values, and a bad option is named as the option."""
    from carso_cli.commands._common import memory_overrides, option_overrides

    overrides = option_overrides(
        ["training.epochs=2"], **memory_overrides("AUTO", "8"), **{"training.batch_size": 32, "training.compile": None}
    )
    assert overrides == {
        "training.epochs": 2,
        "training.attack_chunk": "auto",
        "training.micro_batch": 8,
        "training.batch_size": 32,
    }
    t = load_config("smoke", overrides).training
    assert (t.epochs, t.batch_size, t.attack_chunk, t.micro_batch, t.compile) == (2, 32, "auto", 8, "off")
    assert memory_overrides(None, "0", section="classifier_training") == {"classifier_training.micro_batch": 0}
    with pytest.raises(Exception, match="--micro-batch: expected a number of examples or 'auto', got 'lots'"):
        memory_overrides(None, "lots")
