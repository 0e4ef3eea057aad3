"""GPU memory: sizes, peak measurement, estimates of a training step and an evaluation batch.

One training step of the purifier (section 4.4) has two memory peaks:

- the attack phase: FGSM/PGD through the classifier keeps the classifier's autograd graph for every
  attacked example at once — bounded by ``--attack-chunk`` (the attacks are per-example, so chunking
  does not change them);
- the purifier phase: the representation (26 layers, Table 7) plus the VAE's autograd graph — bounded
  by ``--micro-batch`` (gradient accumulation over micro-batches, each captured and purified in turn;
  BatchNorm then sees micro-batches, "ghost" batch norm).

The estimates measure the bytes autograd saves for backward per example (forwards of two and four
examples on the CPU at the preset's full sizes, float32, differenced), and add parameters, gradients and
optimizer state.
bf16 autocast roughly halves the activation terms, so float32 figures are an upper bound.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from carso_cli.errors import CarsoError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# Allocator fragmentation and workspace (cuDNN, NCCL buckets) on top of what tensors hold.
OVERHEAD = 1.15
PROBES = (2, 4)  # batch sizes of the measuring forwards (their difference is per-example)


def parse_size(text: str) -> int:
    """``80GB`` (10⁹), ``80GiB`` (2³⁰), ``512MB``, or a number of bytes → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise CarsoError(f"cannot read a memory size from '{text}' (e.g. 80GB, 80GiB, 24000MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parse_chunk(text: str | int | None, what: str) -> int | str | None:
    """An ``--attack-chunk``/``--micro-batch`` value: a positive count, ``auto``, or 0/None (whole batch)."""
    if text is None:
        return None
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise CarsoError(f"{what}: expected a number of examples or 'auto', got '{text}'") from None
    if value < 0:
        raise CarsoError(f"{what}: must be ≥ 1 (or 0 for the whole batch), got {value}")
    return value or None


def split(n: int, size: int | None, parts: int | None = None) -> list[slice]:
    """Rows ``0 … n-1`` as ``parts`` near-equal slices, else slices of at most ``size`` (None: one slice)."""
    if parts is not None:
        bounds = [i * n // parts for i in range(parts + 1)]
        return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    if not size or size >= n:
        return [slice(0, n)]
    return [slice(lo, min(lo + size, n)) for lo in range(0, n, size)]


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def reset_peak(device: torch.device) -> bool:
    """Start a new peak: CUDA's allocator statistics, or (Linux) the process's RSS high-water mark.

    Returns False where the CPU peak cannot be reset (it then counts from the start of the process).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # "5" resets VmHWM (Linux ≥ 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_bytes(device: torch.device) -> int:
    """Peak memory since ``reset_peak``: CUDA's max allocated, or the process's peak RSS on the CPU.

    On Linux the RSS peak is /proc's VmHWM, which belongs to this program; ``getrusage``'s maxrss (the
    fallback) also counts what a forking parent had resident before ``exec``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def current_rss() -> int:
    """This process's resident set size now (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs (its activations)."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), str(t.device))] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _params_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclasses.dataclass
class PerExample:
    """Bytes per example of each phase, measured at the preset's full sizes (float32)."""

    attack: int  # classifier graph of one attacked example (FGSM/PGD step)
    representation: int  # the captured representation (Table 7 layers), kept for the purifier pass
    purifier: int  # the purifier's VAE graph (training)
    evaluation: int  # CARSO end to end with the preset's samples (an attack's gradient)
    image: int


@dataclasses.dataclass
class Footprint:
    classifier_params: int
    purifier_params: int
    purifier_inference_params: int
    per_example: PerExample


def per_example_bytes(fn: Callable[[int], Any], probes: tuple[int, int] = PROBES) -> int:
    """Saved-for-backward bytes per example of ``fn(n)``, from the difference of two batch sizes.

    The difference cancels what does not grow with the batch (weights that autograd saves for the
    backward of a convolution or linear layer), which a single probe would count as activations.
    """
    small, large = probes
    return max(0, (saved_bytes(lambda: fn(large)) - saved_bytes(lambda: fn(small))) // (large - small))


def measure(cfg: Any) -> Footprint:
    """Measure the preset's models on the CPU: parameters and per-example activation bytes."""
    from carso_cli.models import CARSO, Purifier, build_classifier, build_purifier, purifier_spec_for
    from carso_cli.models.representation import forward_with_representation

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        classifier = build_classifier(cfg).eval()
        purifier = build_purifier(cfg, classifier).train()
        inference = Purifier(purifier_spec_for(cfg, classifier), inference_only=True).eval()
        size, channels = cfg.data.image_size, cfg.data.channels
        images = torch.rand(max(PROBES), channels, size, size)
        labels = torch.zeros(max(PROBES), dtype=torch.long)
        for p in classifier.parameters():
            p.requires_grad_(False)
        layers = list(purifier.spec.layers)

        def attack(n: int) -> None:
            torch.nn.functional.cross_entropy(classifier(images[:n].clone().requires_grad_(True)), labels[:n])

        def represent(n: int) -> list[torch.Tensor]:
            with torch.no_grad():
                return forward_with_representation(classifier, layers, images[:n], keep_graph=False)[1]

        def purify(n: int) -> None:
            p = purifier
            assert p.input_encoder is not None and p.joint_encoder is not None
            c = p.condition_encoder(represent(n))
            mu, logvar = p.joint_encoder(p.input_encoder(images[:n]), c)
            p.decoder(mu + torch.exp(0.5 * logvar), c)

        model = CARSO(classifier, inference, samples=cfg.inference.samples, aggregation="dexp-logsum")

        def evaluate(n: int) -> None:
            model(images[:n].clone().requires_grad_(True))

        representation = represent(1)
        per = PerExample(
            attack=per_example_bytes(attack),
            representation=sum(r.numel() * r.element_size() for r in representation),
            purifier=per_example_bytes(purify),
            evaluation=per_example_bytes(evaluate),
            image=channels * size * size * 4,
        )
    return Footprint(_params_bytes(classifier), _params_bytes(purifier), _params_bytes(inference), per)


# --------------------------------------------------------------------------------------------------
# Estimating
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingEstimate:
    batch: int  # per-process batch
    attack_chunk: int  # examples attacked at once
    micro_batch: int  # examples per purifier forward/backward
    static: int  # parameters, gradients, optimizer state, the batch's images
    attack_phase: int
    purifier_phase: int

    @property
    def peak(self) -> int:
        return max(self.attack_phase, self.purifier_phase)


def training_static(fp: Footprint, batch: int) -> int:
    # Purifier: weights, gradients, RAdam's two moments, Lookahead's slow weights (5 copies); the frozen
    # classifier's weights; the clean batch and the purifier's input.
    return fp.classifier_params + 5 * fp.purifier_params + 2 * batch * fp.per_example.image


def classifier_training_static(fp: Footprint, batch: int) -> int:
    # train-classifier: weights, gradients and SGD momentum (3 copies); the clean batch and its PGD version.
    return 3 * fp.classifier_params + 2 * batch * fp.per_example.image


def classifier_fitting_options(fp: Footprint, budget: int, batch: int) -> dict[str, int]:
    """train-classifier: the largest attack chunk and micro-batch within ``budget``. Both phases keep the
    classifier's graph per example (PGD for the input gradient, the step for the weights' gradients)."""
    fits = largest_fitting(budget, classifier_training_static(fp, batch), fp.per_example.attack, batch)
    return {"attack_chunk": fits, "micro_batch": fits}


def estimate_training(
    fp: Footprint, batch: int, attacked: int, attack_chunk: int | None = None, micro_batch: int | None = None
) -> TrainingEstimate:
    """Peak bytes of one purifier training step for a per-process ``batch`` with ``attacked`` examples."""
    chunk = min(attack_chunk or attacked, attacked) if attacked else 0
    micro = min(micro_batch or batch, batch)
    static = training_static(fp, batch)
    pe = fp.per_example
    attack_phase = static + chunk * pe.attack
    # The representation is captured per micro-batch, right before the purifier pass that consumes it.
    purifier_phase = static + micro * (pe.representation + pe.purifier)
    return TrainingEstimate(
        batch, chunk, micro, int(static * OVERHEAD), int(attack_phase * OVERHEAD), int(purifier_phase * OVERHEAD)
    )


def estimate_evaluation(fp: Footprint, batch: int) -> int:
    """Peak bytes of one attack step on CARSO (forward + input gradient) for ``batch`` examples."""
    static = fp.classifier_params + fp.purifier_inference_params + 2 * batch * fp.per_example.image
    return int((static + batch * fp.per_example.evaluation) * OVERHEAD)


def largest_fitting(budget: int, fixed: int, per_example: int, cap: int) -> int:
    """The largest count n ≤ cap with (fixed + n·per_example)·OVERHEAD ≤ budget (0 if none fits)."""
    room = budget / OVERHEAD - fixed
    if room <= 0 or per_example <= 0:
        return 0 if room <= 0 else cap
    return max(0, min(cap, int(room // per_example)))


def fitting_options(fp: Footprint, budget: int, batch: int) -> dict[str, int]:
    """The largest attack chunk and micro-batch that fit ``budget`` (0: not even one example fits)."""
    static = training_static(fp, batch)
    pe = fp.per_example
    return {
        "attack_chunk": largest_fitting(budget, static, pe.attack, batch),
        "micro_batch": largest_fitting(budget, static, pe.representation + pe.purifier, batch),
        "eval_batch": largest_fitting(
            budget, fp.classifier_params + fp.purifier_inference_params, pe.evaluation + 2 * pe.image, 10_000
        ),
    }


def auto_chunk(device: torch.device, fixed: int, per_example: int, cap: int) -> int:
    """``auto``: the largest chunk the device's free memory holds now (CPU: the whole batch)."""
    if device.type != "cuda":
        return cap
    free, _total = torch.cuda.mem_get_info(device)
    return max(1, largest_fitting(int(free + torch.cuda.memory_allocated(device)), fixed, per_example, cap))


# --------------------------------------------------------------------------------------------------
# Out of memory
# --------------------------------------------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def out_of_memory_message(
    device: torch.device,
    batch: int,
    attack_chunk: int | None,
    micro_batch: int | None,
    suggestion: dict[str, int] | None = None,
) -> str:
    """One line: what was in use, the peak, and the options that would fit."""
    peak = format_bytes(peak_bytes(device))
    used = f"per-process batch {batch}, --attack-chunk {attack_chunk or batch}, --micro-batch {micro_batch or batch}"
    fix = "lower --attack-chunk / --micro-batch (or pass 'auto')"
    if suggestion:
        fix = (
            " ".join(
                f"--{k.replace('_', '-')} {v}"
                for k, v in suggestion.items()
                if v and k in ("attack_chunk", "micro_batch")
            )
            + " should fit"
        )
    return f"out of GPU memory on {device} ({used}; peak {peak}): {fix}; `carso info --gpu-memory` estimates them"
