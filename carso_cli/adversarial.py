"""Adversarial examples in and out: one file that carso and other tools (AutoAttack, torchattacks,
RobustBench) exchange, so transfer attacks and claims from other papers can be checked.

File format (safetensors, written atomically): ``y`` (N,) int64 labels, ``idx`` (N,) int64 test-set
indices, and per attack A ``x_adv.A`` (N, C, H, W) float32 in [0, 1] and ``flags.A`` (N,) uint8 (1 =
the model was right on the example after the attack); the header holds the format, ε and the attacks.
Read back are these files, and any safetensors or ``.pt`` file (``torch.load(weights_only=True)``: never
runs code) of tensors ``x_adv`` and ``y``, optionally ``idx``.

Before anything is evaluated the examples are checked: shape, dtype, range, labels, and with ``idx``
the ℓ∞ distance to the clean test images against ε (section 5.1's threat model) — a file beyond ε is
a different threat model and is refused, not evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carso_cli import checkpoint as ckpt
from carso_cli.errors import CarsoError

FORMAT = "carso-adversarial/1"
# float32 rounding of x + δ (and of images stored as k/255) stays far below this; an attack that
# overshoots ε by more is not in the threat model.
EPS_TOLERANCE = 1e-5


@dataclass
class AdversarialSet:
    """Adversarial examples of one attack: x_adv (N, C, H, W) float32, y (N,) int64, idx (N,) or None."""

    attack: str
    x_adv: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor | None


def save_adversarial(
    path: str | Path,
    y: torch.Tensor,
    idx: torch.Tensor,
    attacks: dict[str, tuple[torch.Tensor, torch.Tensor]],
    eps: float,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``attacks`` (name → (x_adv (N, C, H, W), flags (N,) bool)) with labels and test-set indices."""
    if not attacks:
        raise CarsoError("no adversarial examples to save (the evaluation ran no attack)")
    tensors: dict[str, torch.Tensor] = {"y": y.to(torch.int64), "idx": idx.to(torch.int64)}
    for name, (x_adv, flags) in attacks.items():
        if x_adv.shape[0] != y.shape[0] or flags.shape != y.shape:
            raise ValueError(f"{name}: {x_adv.shape[0]} examples and {flags.shape} flags for {y.shape[0]} labels")
        tensors[f"x_adv.{name}"] = x_adv.to(torch.float32)
        tensors[f"flags.{name}"] = flags.to(torch.uint8)
    header = {"format": FORMAT, "eps": repr(float(eps)), "attacks": json.dumps(list(attacks))}
    header.update({k: str(v) for k, v in (metadata or {}).items()})
    ckpt.save_tensors(path, tensors, header)
    return Path(path)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CarsoError(f"adversarial examples file not found: {path}")
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle and zip errors alike: the file is not a tensor dict we can read
            raise CarsoError(f"{path} is not a readable .pt file of tensors ({type(err).__name__}: {err})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CarsoError(f"{path} must hold a dict of tensors (x_adv, y, optionally idx)")
        return obj
    return ckpt.load_tensors(path)[0]


def load_adversarial(path: str | Path) -> list[AdversarialSet]:
    """Every attack's examples in ``path`` (unchecked: see ``check``)."""
    path = Path(path)
    tensors = _read(path)
    if "y" not in tensors:
        raise CarsoError(f"{path} has no 'y' (labels); it needs x_adv and y, optionally idx")
    names = [k[len("x_adv.") :] for k in tensors if k.startswith("x_adv.")]
    sets = [AdversarialSet(n, tensors[f"x_adv.{n}"], tensors["y"], tensors.get("idx")) for n in names]
    if "x_adv" in tensors:
        sets.insert(0, AdversarialSet(path.stem, tensors["x_adv"], tensors["y"], tensors.get("idx")))
    if not sets:
        raise CarsoError(f"{path} has no 'x_adv' (adversarial images); it needs x_adv and y, optionally idx")
    return sets


def linf_distance(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-example ℓ∞ distance (N,); NaN where x_adv has a NaN."""
    d = (x_adv.double() - x.double()).abs().flatten(1)
    return torch.where(d.isnan().any(dim=1), torch.full_like(d[:, 0], float("nan")), d.amax(dim=1))


def check(
    a: AdversarialSet, *, shape: tuple[int, int, int], num_classes: int, eps: float, dataset: Any, source: str = ""
) -> AdversarialSet:
    """``a`` with x_adv as float32 and y, idx as int64, or a CarsoError saying what is wrong.

    ``shape`` (C, H, W) is the model's input; ``dataset`` the clean test set (``dataset[i]`` → (x, y)).
    """
    from carso_cli.evaluation import load_examples

    where = f"{source} ({a.attack})" if source else a.attack
    x, y = a.x_adv, a.y
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise CarsoError(
            f"{where}: x_adv has shape {tuple(x.shape)}, the model takes (N, {', '.join(map(str, shape))})"
        )
    if not x.is_floating_point():
        raise CarsoError(f"{where}: x_adv has dtype {x.dtype}; give float images in [0, 1]")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.dtype == torch.bool:
        raise CarsoError(f"{where}: y must be {x.shape[0]} integer labels, got {y.dtype} of shape {tuple(y.shape)}")
    if x.shape[0] == 0:
        raise CarsoError(f"{where}: no examples")
    x = x.float()
    y = y.long()
    nan = int(x.flatten(1).isnan().any(dim=1).sum())
    if nan:
        raise CarsoError(f"{where}: {nan} example(s) contain NaN; nothing evaluated")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise CarsoError(
            f"{where}: x_adv lies in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside [0, 1] (images must be "
            "in [0, 1], not normalised or 0–255)"
        )
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise CarsoError(f"{where}: labels outside 0…{num_classes - 1}")
    idx = a.idx
    if idx is not None:
        if idx.dim() != 1 or idx.shape[0] != x.shape[0] or idx.is_floating_point():
            raise CarsoError(
                f"{where}: idx must be {x.shape[0]} integer test-set indices, got shape {tuple(idx.shape)}"
            )
        idx = idx.long()
        if int(idx.min()) < 0 or int(idx.max()) >= len(dataset):
            raise CarsoError(f"{where}: idx outside the test set (0…{len(dataset) - 1})")
        clean_x, clean_y = load_examples(dataset, [int(i) for i in idx])
        wrong = int((clean_y != y).sum())
        if wrong:
            raise CarsoError(f"{where}: {wrong} label(s) differ from the test set's at their idx; nothing evaluated")
        dist = linf_distance(x, clean_x)
        beyond = int((dist > eps + EPS_TOLERANCE).sum())
        if beyond:
            raise CarsoError(
                f"{where}: {beyond} example(s) lie beyond ε = {eps:.6g} of their clean test images (largest ℓ∞ "
                f"distance {float(dist.max()):.6g}); nothing evaluated"
            )
    return AdversarialSet(a.attack, x, y, idx)


class FileSource:
    """``carso eval --adversarial FILE`` as an attack source of the evaluation runner (``evaluation.evaluate``):
    no attack runs, each attack's examples in the file (checked: ``check``) are classified.

    Batch ``rng`` is the file's examples ``rng``; flags ``classifier.A`` and ``carso.A`` (with
    ``carso.A_repeats``) per attack A, columns ``AT/A`` and ``C/A``. CARSO's verdict is the paper's
    decision rule: the argmax of one aggregated forward (section 4.5), its z seeded per example (by the
    test-set index, else the position in the file) as in ``carso eval``; it is then re-classified
    ``repeats`` times. With ``idx``, a robust flag also needs the clean example right (as ``carso eval`` counts).
    """

    def __init__(self, sets: list[AdversarialSet], dataset: Any) -> None:
        self.sets = sets
        self.dataset = dataset
        first = sets[0]
        self.idx = first.idx if first.idx is not None else torch.arange(first.x_adv.shape[0])

    def __len__(self) -> int:
        return int(self.sets[0].x_adv.shape[0])

    def examples(self, rng: range) -> tuple[torch.Tensor, torch.Tensor]:
        """The labels of batch ``rng`` (the examples themselves are per attack: ``flags`` reads them)."""
        part = slice(rng.start, rng.stop)
        return self.sets[0].x_adv[part], self.sets[0].y[part]

    def flags(
        self,
        classifier: torch.nn.Module,
        carso: torch.nn.Module | None,
        x: torch.Tensor,
        y: torch.Tensor,
        rng: range,
        s: Any,
        device: torch.device,
        **_: Any,
    ) -> dict[str, Any]:
        from carso_cli import evaluation as ev

        part = slice(rng.start, rng.stop)
        ids = [int(i) for i in self.idx[part]]
        clean_x = ev.load_examples(self.dataset, ids)[0].to(device) if self.sets[0].idx is not None else None
        out: dict[str, Any] = {}
        for a in self.sets:
            xa = a.x_adv[part].to(device)
            if "classifier" in s.targets:
                adv = ev.classifier_flags(classifier, xa, y)
                if clean_x is not None:
                    adv = adv & ev.classifier_flags(classifier, clean_x, y)
                out[f"classifier.{a.attack}"] = adv.int().tolist()
            if "carso" in s.targets and carso is not None:
                adv = ev.draw_flags(carso, xa, y, ids, s.seed, ev.STREAM_ADV)[0]
                if clean_x is not None:
                    adv = adv & ev.draw_flags(carso, clean_x, y, ids, s.seed, ev.STREAM_CLEAN)[0]
                out[f"carso.{a.attack}"] = adv.int().tolist()
                reps = ev.draw_flags(carso, xa, y, ids, s.seed, ev.STREAM_ADV_REPEATS, s.repeats)
                out[f"carso.{a.attack}_repeats"] = reps.int().tolist()
        return out

    def summarize(self, flags: dict[str, list[Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Columns ``AT/A`` and ``C/A`` per attack A (in the file's order), and A's re-classification report."""
        from carso_cli.evaluation.report import accuracy_entry, reclassification

        metrics: dict[str, Any] = {}
        report: dict[str, Any] = {}
        for a in self.sets:
            if f"classifier.{a.attack}" in flags:
                metrics[f"AT/{a.attack}"] = accuracy_entry(f"classifier.{a.attack}", flags[f"classifier.{a.attack}"])
            key = f"carso.{a.attack}"
            if key in flags:
                metrics[f"C/{a.attack}"] = accuracy_entry(key, flags[key])
                report[a.attack] = reclassification(flags[key], flags[f"{key}_repeats"])
        return metrics, report


def file_source(path: Path, sets: list[AdversarialSet], cfg: Any, eps: float, dataset: Any) -> FileSource:
    """The checked examples of ``load_adversarial(path)`` (all checked before any is evaluated) as a source."""
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    checked = [
        check(a, shape=shape, num_classes=cfg.data.num_classes, eps=eps, dataset=dataset, source=str(path))
        for a in sets
    ]
    if len({a.x_adv.shape[0] for a in checked}) > 1:
        raise CarsoError(f"{path}: its attacks hold different numbers of examples")
    return FileSource(checked, dataset)
