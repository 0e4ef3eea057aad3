"""What ``config.validate`` checks: the bounds of every number, the choices of every string, the relations
between keys. Each failure is one line naming the key and where its value came from (the preset file,
or "command line" for ``--set`` and the options standing for a key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from carso_cli.aggregation import AGGREGATIONS
from carso_cli.config import (
    ACTIVATIONS,
    ADVERSARIAL_COUNTS,
    DATASETS,
    DECODERS,
    EPS_SPACES,
    NORMALIZE,
    SCHEDULES,
    Config,
    eps_scale,
    source_problem,
)
from carso_cli.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """The values a number may take: ``lo``/``hi`` (None: unbounded), each inclusive unless ``open_*``."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    note: str = ""  # what the numbers are in, said after the bound

    def holds(self, value: float) -> bool:
        above = self.lo is None or (value > self.lo if self.open_lo else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.open_hi else value <= self.hi)
        return above and below

    def __str__(self) -> str:
        if self.hi is None:
            text = f"must be {'>' if self.open_lo else '≥'} {self.lo:g}"
        else:
            text = f"must lie in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"
        return f"{text} ({self.note})" if self.note else text


AT_LEAST_0, AT_LEAST_1, POSITIVE = Bound(0), Bound(1), Bound(0, open_lo=True)
UNIT, BETA, PIXEL = Bound(0, 1), Bound(0, 1, open_hi=True), Bound(0, 1, note="pixel scale")

# The bounds of every numeric key (a list: of each of its values). Keys absent here take any value of
# their type (booleans, names, seeds) or are checked in ``_check_choices`` / ``_check_relations``.
BOUNDS: dict[str, Bound] = {
    **{f"data.{k}": AT_LEAST_1 for k in ("image_size", "channels", "synthetic_train_size", "synthetic_test_size")},
    "data.num_classes": Bound(2),
    "data.std": POSITIVE,
    "data.crop_padding": AT_LEAST_0,
    "data.num_workers": AT_LEAST_0,
    "classifier.width": AT_LEAST_1,
    **{f"purifier.{k}": AT_LEAST_1 for k in ("layerwise_depth", "fcrepr", "fjoint", "max_fc_parameters")},
    "purifier.input_encoder_channels": AT_LEAST_1,
    "purifier.decoder_channels": AT_LEAST_1,
    "purifier.leaky_slope": AT_LEAST_0,
    **{f"training.{k}": AT_LEAST_1 for k in ("epochs", "batch_size", "lookahead_k", "checkpoint_every")},
    "training.reference_world_size": AT_LEAST_1,
    **{f"training.{k}": AT_LEAST_0 for k in ("warmup_epochs", "plateau_epochs", "annealing_epochs")},
    **{f"training.{k}": AT_LEAST_0 for k in ("beta_start_epoch", "beta_end_epoch", "weight_decay")},
    **{f"training.{k}": AT_LEAST_0 for k in ("initial_lr", "plateau_lr", "final_lr")},
    "training.plateau_lr_per_example": AT_LEAST_0,  # 0: use plateau_lr
    "training.final_lr_per_example": AT_LEAST_0,  # 0: use final_lr
    "training.adversarial_fraction": UNIT,
    "training.lookahead_alpha": UNIT,
    "training.radam_beta1": BETA,
    "training.radam_beta2": BETA,
    "training.radam_eps": POSITIVE,
    **{f"attacks.{k}": PIXEL for k in ("eps", "pgd_step_size", "pgd_eot_step_size", "sanity_eps")},
    **{f"attacks.{k}": AT_LEAST_1 for k in ("pgd_steps", "pgd_eot_steps", "pgd_eot_iterations")},
    "attacks.randaa_eot_iterations": AT_LEAST_1,
    "inference.samples": AT_LEAST_0,  # 0: one deterministic reconstruction
    **{f"classifier_training.{k}": AT_LEAST_1 for k in ("epochs", "batch_size", "pgd_steps")},
    "classifier_training.lr": POSITIVE,
    "classifier_training.momentum": UNIT,
    "classifier_training.weight_decay": AT_LEAST_0,
    "classifier_training.pgd_step_size": PIXEL,
}
# Memory bounds (carso_cli/memory.py): a count of examples, 0 (the whole per-process batch) or "auto".
MEMORY_BOUNDS = [f"{s}.{k}" for s in ("training", "classifier_training") for k in ("attack_chunk", "micro_batch")]


def _value(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def check(cfg: Config, source: str) -> None:
    """``config.validate``: every bound (``BOUNDS``, ``MEMORY_BOUNDS``), choice and relation of ``cfg``."""
    for key, bound in BOUNDS.items():
        value = _value(cfg, key)
        if not all(bound.holds(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{source}: '{key}' {bound}, got {value!r}")
    for key in MEMORY_BOUNDS:
        value = _value(cfg, key)
        if value != "auto" and (isinstance(value, str) or value < 0):
            raise ConfigError(
                f"{source}: '{key}' must be a number of examples ≥ 1, 0 (the whole batch) or 'auto', got {value!r}"
            )
    why = _check_choices(cfg) or _check_relations(cfg)
    if why is not None:
        raise ConfigError(f"{source}: '{why[0]}' {why[1]}")


def _one_of(choices: tuple[str, ...]) -> str:
    return f"must be one of {', '.join(choices)}"


def _check_choices(cfg: Config) -> tuple[str, str] | None:
    """The first string key whose value is not one of its choices, and why (None: all are)."""
    d, c, p, t = cfg.data, cfg.classifier, cfg.purifier, cfg.training
    if not (d.dataset in DATASETS or d.dataset.startswith("imagefolder:")):
        return "data.dataset", f"{_one_of(DATASETS)} or imagefolder:PATH, got {d.dataset!r}"
    if source_problem(c.architecture):
        return "classifier.architecture", str(source_problem(c.architecture))
    if isinstance(p.layers, str) and not (p.layers == "auto" or p.layers.startswith("rule:")):
        return (
            "purifier.layers",
            "must be 'auto', a list of layer names / patterns, or a rule such as 'rule:block-convs'",
        )
    choices = {
        "classifier.normalize": (c.normalize, NORMALIZE),
        "classifier.activation": (c.activation, ACTIVATIONS),
        "purifier.decoder": (p.decoder, DECODERS),
        "training.schedule": (t.schedule, SCHEDULES),
        "training.adversarial_count": (t.adversarial_count, ADVERSARIAL_COUNTS),
        "training.loss_reduction": (t.loss_reduction, ("mean", "sum")),
        "attacks.train_eps_space": (cfg.attacks.train_eps_space, EPS_SPACES),
        "inference.aggregation": (cfg.inference.aggregation, AGGREGATIONS),
        "classifier_training.adversarial": (cfg.classifier_training.adversarial, ("pgd", "none")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            return key, f"{_one_of(allowed)}, got {value!r}"
    for key, value in {"classifier.threat_model": c.threat_model, "training.compile": t.compile}.items():
        if not value.strip():
            return key, "must not be empty"  # (the compile backend itself is checked when training starts)
    return None


def _check_relations(cfg: Config) -> tuple[str, str] | None:
    """The first key that contradicts another (counts of a list, order of epochs …), and why."""
    d, c, p = cfg.data, cfg.classifier, cfg.purifier
    if len(d.mean) != d.channels or len(d.std) != d.channels:
        return "data.mean/std", f"need {d.channels} values each (one per channel)"
    if (c.depth - 4) % 6 != 0 or c.depth < 10:
        return "classifier.depth", "must be 6·n + 4 with n ≥ 1 (e.g. 10, 16, 28, 34, 70)"
    if int(p.decoder.split("x")[0]) != d.image_size:
        return "purifier.decoder", f"{p.decoder} does not produce {d.image_size}×{d.image_size} images"
    if len(p.decoder_channels) != 5:
        return "purifier.decoder_channels", "needs 5 values (Linear output channels, then 4 blocks)"
    if len(p.input_encoder_channels) != 2:
        return "purifier.input_encoder_channels", "needs 2 values (Table 6)"
    if cfg.training.beta_end_epoch < cfg.training.beta_start_epoch:
        return "training.beta_end_epoch", "must not precede beta_start_epoch"
    scale = eps_scale(cfg)
    for key in ("fgsm_eps", "pgd_eps"):
        if any(not 0.0 <= e * scale <= 1.0 for e in getattr(cfg.attacks, key)):
            return f"attacks.{key}", "values must lie in [0, 1] in pixel scale (after train_eps_space)"
    return None
