"""The classifier's training step: PGD adversarial training (Madry et al., 2018) or standard training.

Adversarial: every example is replaced by a PGD attack at the preset's ε (``pgd_steps`` sign steps of
``pgd_step_size`` from a uniform random start drawn for the global batch) and the model is trained on
those; cross-entropy, SGD, the LR annealed by a cosine per batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from carso_cli import attacks, memory
from carso_cli import training as tr
from carso_cli.training.bounds import Bounds, pieces, run_bounded
from carso_cli.training.session import Session

SUMS = ["loss", "correct", "count"]


class ClassifierSteps:
    """The classifier's part of the loop (``Session.loop``): the LR, a step, its display."""

    sums = SUMS

    def __init__(self, session: Session, model: nn.Module, optimizer: torch.optim.Optimizer, batches: int) -> None:
        """``batches``: global batches per epoch (the cosine runs over ``epochs × batches`` steps)."""
        self.session, self.model, self.optimizer = session, model, optimizer
        self.ct = session.cfg.classifier_training
        self.net = session.parallel(model)
        model.train()
        self.batches = batches
        self.total_steps = self.ct.epochs * batches
        self.adversarial = self.ct.adversarial == "pgd"
        self.bounds = Bounds.of(self.ct.attack_chunk, self.ct.micro_batch)

    def start_epoch(self, epoch: int) -> dict[str, float]:
        return {"lr": tr.cosine_lr(self.ct.lr, epoch * self.batches, self.total_steps)}

    def display(self, sums: list[float]) -> dict[str, float]:
        n = max(sums[2], 1.0)
        return {"loss": sums[0] / n, "accuracy": sums[1] / n}

    def footprint(self, n: int) -> tuple[int, int, int]:  # for "auto": static bytes, per attacked, per trained example
        fp = memory.measure(self.session.cfg)
        return memory.classifier_training_static(fp, n), fp.per_example.attack, fp.per_example.attack

    def make_input(self, b: tr.Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(training input, labels) of a batch: PGD examples (adversarial training) or the clean ones."""
        s = self.session
        x, y = s.batch(b)
        self.bounds.resolve(x.shape[0], s.device, lambda: self.footprint(x.shape[0]))
        if not self.adversarial:
            return x, y
        # Madry et al.: PGD from a uniform random start, drawn for the global batch (rank-independent).
        # The model stays in train mode, as in Madry et al.'s and Rice et al.'s training code; its
        # (synchronised) BatchNorm then runs collectives, so every rank attacks in as many chunks.
        gen = tr.batch_generator(s.device, s.seed, b.epoch, b.index, 3)
        noise = torch.rand((b.global_size, *x.shape[1:]), generator=gen, device=s.device)[b.lo : b.hi]
        chunk = self.bounds.attack_chunk
        with s.autocast():
            x = attacks.in_chunks(
                attacks.pgd,
                chunk,
                self.model,
                x,
                y,
                s.cfg.attacks.eps,
                self.ct.pgd_steps,
                self.ct.pgd_step_size,
                start_noise=noise,
                parts=pieces(b.global_size, s.ctx.world_size, chunk),
            )
        return x, y

    def compute(self, b: tr.Batch) -> torch.Tensor:
        """Forward and backward of this rank's rows; (loss, correct, count) summed, float64. Memory bounds
        and the out-of-memory retry: ``run_bounded``."""
        s, n = self.session, b.hi - b.lo

        def fits() -> dict[str, int]:
            total = torch.cuda.get_device_properties(s.device).total_memory
            return memory.classifier_fitting_options(memory.measure(s.cfg), total, n)

        reset = lambda: self.optimizer.zero_grad(set_to_none=True)  # noqa: E731
        return run_bounded(lambda: self._bounded(b), self.bounds, n, s.device, reset, fits, s.say)

    def _bounded(self, b: tr.Batch) -> torch.Tensor:
        s = self.session
        for group in self.optimizer.param_groups:
            group["lr"] = tr.cosine_lr(self.ct.lr, b.epoch * self.batches + b.index, self.total_steps)
        x, y = self.make_input(b)

        def step(rows: slice) -> torch.Tensor:
            with s.autocast():
                logits = self.net(x[rows])
            loss = F.cross_entropy(logits.float(), y[rows], reduction="sum")
            # DDP averages gradients over ranks: Σ_local / B_global · world = the global batch mean.
            (loss * (s.ctx.world_size / b.global_size)).backward()
            correct = (logits.detach().argmax(1) == y[rows]).sum()
            return torch.stack([loss.detach().double(), correct.double()])

        parts = pieces(b.global_size, s.ctx.world_size, self.bounds.micro_batch)
        sums = tr.accumulate(x.shape[0], self.bounds.micro_batch, step, s.no_sync(self.net), parts=parts)
        return torch.cat([sums, torch.tensor([float(y.shape[0])], device=sums.device, dtype=torch.float64)])
