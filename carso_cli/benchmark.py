"""Throughput of the real code paths, on whatever device is present: what ``carso bench`` measures.

- ``train``: purifier training images/s (adversarially-balanced batches with FGSM/PGD against the
  classifier, representation capture, VAE forward/backward, RAdam+Lookahead) — it runs
  ``train-purifier`` itself for a few batches of the preset's full model on synthetic data. The paper
  needed 159 min on 8 A100s for 200 epochs of scenario (a) (Table 1): about 131 images/s per A100.
- ``attack``: CARSO end-to-end gradient evaluations per second (one forward + backward of the whole
  model: representation, N decodes, N·B classifier passes, aggregation), and the randomized-AutoAttack
  time that implies for the CIFAR-10 test set (APGD-CE + APGD-DLR, 100 iterations × 20 EoT each, an
  upper bound: AutoAttack stops attacking examples once they are broken).

Figures go to BENCHMARKS.md with the command and the device that ``carso bench`` prints.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from carso_cli import memory
from carso_cli.config import Config


def environment(device: torch.device) -> dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = str(torch.get_num_threads())
    return info


def bench_train(
    cfg: Config,
    device: torch.device,
    batch_size: int,
    batches: int,
    train: Callable[..., Any],
    seed: int = 0,
    console: Any = None,
) -> dict[str, Any]:
    """Images/s of ``train-purifier`` (second epoch, so start-up and cuDNN autotuning are excluded).

    ``train``: the purifier training itself, ``train(cfg, classifier_weights, out, device=…, seed=…,
    console=…)`` returning a result with ``records`` (one per epoch); passed in because it is the
    command's code (the library does not import the commands).
    """
    from carso_cli import checkpoint as ckpt
    from carso_cli.config import apply_overrides
    from carso_cli.models import build_classifier

    apply_overrides(
        cfg,
        {
            "data.dataset": "synthetic",
            "data.synthetic_train_size": batch_size * batches,
            "data.synthetic_test_size": batch_size,
            "data.augment": False,
            "training.batch_size": batch_size,
            "training.epochs": 2,
            "training.checkpoint_every": 1000,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(seed)
        classifier = build_classifier(cfg)
        weights = Path(tmp) / "classifier.safetensors"
        ckpt.save_tensors(weights, classifier.state_dict())
        memory.reset_peak(device)
        result = train(cfg, weights, Path(tmp) / "run", device=device, seed=seed, console=console)
        peak = memory.peak_bytes(device)
    last = result.records[-1]
    return {
        "images_per_s": last["images_per_s"],
        "epoch_s": last["time_s"],
        "batch_size": batch_size,
        "batches": batches,
        "adversarial_fraction": cfg.training.adversarial_fraction,
        "pgd_steps": cfg.attacks.pgd_steps,
        **_peak(device, peak),
    }


def _peak(device: torch.device, peak: int) -> dict[str, Any]:
    """Peak memory: CUDA's max allocated (this run), or the process's peak RSS on CPU (since start)."""
    what = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"
    return {"peak_memory_bytes": peak, "peak_memory": memory.format_bytes(peak), "peak_memory_kind": what}


def adaptive_passes_per_example(cfg: Config) -> dict[str, float]:
    """CARSO forward+backward passes per example of each attack of ``--attack adaptive`` with the preset's
    budgets (``evaluation.cost.adaptive_passes``; the representation attack's classifier passes count as
    CARSO's, an overestimate)."""
    from carso_cli.evaluation.cost import adaptive_passes
    from carso_cli.evaluation.settings import EvalSettings

    s = EvalSettings.from_options(cfg, attack="adaptive", targets=["carso"])
    return {name: round(sum(adaptive_passes(name, s)), 1) for name in s.adaptive_attacks}


def bench_attack(
    cfg: Config, device: torch.device, batch_size: int, iterations: int, seed: int = 0, bf16: bool = False
) -> dict[str, Any]:
    """End-to-end CARSO gradient evaluations per second, and the randAA time they imply."""
    from carso_cli.models import CARSO, Purifier, build_classifier, purifier_spec_for, set_eval_frozen

    torch.manual_seed(seed)
    classifier = build_classifier(cfg).to(device)
    purifier = Purifier(purifier_spec_for(cfg, classifier), inference_only=True).to(device)
    model = CARSO(classifier, purifier, samples=cfg.inference.samples, aggregation=cfg.inference.aggregation)
    set_eval_frozen(classifier, purifier)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = cfg.data.image_size
    x = torch.rand(batch_size, cfg.data.channels, size, size, device=device)
    y = torch.randint(0, cfg.data.num_classes, (batch_size,), device=device)

    def step() -> None:
        xa = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = model(xa)
        loss = torch.nn.functional.cross_entropy(scores.float(), y)
        torch.autograd.grad(loss, xa)

    step()  # warm-up (allocator, cuDNN autotuning)
    memory.reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    grads_per_s = batch_size * iterations / elapsed  # example-gradients per second
    # Randomized AutoAttack (section 5.1): APGD-CE and APGD-DLR, 100 iterations × 20 EoT each, plus
    # the initial and final forwards; an upper bound (broken examples are not attacked again).
    per_example = 2 * 100 * cfg.attacks.randaa_eot_iterations
    test_set = 10_000
    adaptive = adaptive_passes_per_example(cfg)
    out = {
        "example_gradients_per_s": grads_per_s,
        "batch_size": batch_size,
        "samples": cfg.inference.samples,
        "bf16": bf16,
        "randaa_hours_for_10k_upper_bound": test_set * per_example / grads_per_s / 3600,
        # The default evaluation, every attack on every example (an upper bound: each attack after randAA
        # runs only on the examples still robust), with its per-attack passes.
        "adaptive_passes_per_example": adaptive,
        "adaptive_hours_for_10k_upper_bound": test_set * sum(adaptive.values()) / grads_per_s / 3600,
    }
    return {**out, **_peak(device, memory.peak_bytes(device))}
