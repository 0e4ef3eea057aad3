"""The purifier's training step (sections 4.4 and 5.1): an adversarially-balanced batch, the classifier's
representation of it, the purifier's VAE pass, and the loss (summed BCE to the *clean* image plus β·KL).

Every random draw (the attacks' starts, the reparameterisation noise) comes from a (seed, epoch, batch)
generator for the global batch and is sliced for the rank, so N processes compute what one does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from carso_cli import memory
from carso_cli import training as tr
from carso_cli.config import eps_scale
from carso_cli.models import Purifier
from carso_cli.models.representation import forward_with_representation
from carso_cli.training.bounds import Bounds, pieces, run_bounded
from carso_cli.training.compiled import maybe_compile
from carso_cli.training.session import Session

SUMS = ["loss", "bce", "kl", "count"]


class PurifierTrainStep(nn.Module):
    """The purifier's training pass with its reparameterisation noise given from outside.

    The noise ε ~ N(0, I) is drawn for the global batch from a (seed, epoch, batch) generator, so it does
    not depend on how the batch is split across ranks. Wrapping the pass in one module lets DDP see it.
    """

    def __init__(self, purifier: Purifier) -> None:
        super().__init__()
        self.purifier = purifier

    def forward(
        self, x: torch.Tensor, representation: list[torch.Tensor], noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) purifier input; noise: (B, fjoint). Returns (reconstruction, μ, log σ²)."""
        p = self.purifier
        if p.input_encoder is None or p.joint_encoder is None:
            raise RuntimeError("an inference-only purifier cannot be trained")
        c = p.condition_encoder(representation)
        mu, logvar = p.joint_encoder(p.input_encoder(x), c)
        z = mu + noise.to(mu.dtype) * torch.exp(0.5 * logvar)  # reparameterisation trick
        return p.decoder(z, c), mu, logvar


class PurifierSteps:
    """The purifier's part of the loop (``Session.loop``): the epoch's LR and β, a step, its display."""

    sums = SUMS

    def __init__(self, session: Session, classifier: nn.Module, purifier: Purifier, optimizer: Any) -> None:
        cfg, t = session.cfg, session.cfg.training
        self.session, self.cfg, self.classifier, self.purifier, self.optimizer = (
            session,
            cfg,
            classifier,
            purifier,
            optimizer,
        )
        self.module = session.parallel(PurifierTrainStep(purifier))
        purifier.train()
        # torch.compile (training.compile): the classifier as the attacks call it, and the purifier's pass.
        self.attacked = maybe_compile(classifier, t.compile, "attacked classifier", session.say)
        self.train_pass = maybe_compile(self.module, t.compile, "purifier's training pass", session.say)
        self.layers = list(purifier.spec.layers)
        self.eps_scale = eps_scale(cfg)
        tr.attack_strengths(cfg.attacks, self.eps_scale)  # fail early on a malformed preset
        self.plans: dict[int, tr.BalancedPlan] = {}  # global batch size → plan (a kept last batch is smaller)
        self.bounds = Bounds.of(t.attack_chunk, t.micro_batch)
        self.beta = 0.0

    def plan(self, size: int) -> tr.BalancedPlan:
        if size not in self.plans:
            t = self.cfg.training
            count = tr.adversarial_count(size, t.adversarial_fraction, t.adversarial_count, t.reference_world_size)
            self.plans[size] = tr.balanced_batch_plan(size, t.adversarial_fraction, count)
        return self.plans[size]

    def loss_scale(self, size: int) -> float:
        # DDP averages gradients over ranks; "mean": Σ_local / B_global · world = the global batch mean,
        # "sum": Σ_local · world = the global batch sum (the authors' loss × world_size).
        world = self.session.ctx.world_size
        return world / size if self.cfg.training.loss_reduction == "mean" else world

    def start_epoch(self, epoch: int) -> dict[str, float]:
        lr = tr.lr_at_epoch(self.cfg.training, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.beta = tr.beta_at_epoch(self.cfg.training, epoch)
        return {"beta": self.beta, "lr": lr}

    def display(self, sums: list[float]) -> dict[str, float]:
        n = max(sums[3], 1.0)
        return {"loss": sums[0] / n, "bce": sums[1] / n, "kl": sums[2] / n}

    def compute(self, b: tr.Batch) -> torch.Tensor:
        """Forward and backward of this rank's rows; (loss, bce, kl, count) summed, float64. Memory bounds
        and the out-of-memory retry: ``run_bounded``."""
        cfg, device, n = self.cfg, self.session.device, b.hi - b.lo

        def footprint() -> tuple[int, int, int]:  # for "auto": static bytes, per attacked, per purified example
            fp = memory.measure(cfg)
            return (
                memory.training_static(fp, n),
                fp.per_example.attack,
                fp.per_example.representation + fp.per_example.purifier,
            )

        def fits() -> dict[str, int]:
            return memory.fitting_options(memory.measure(cfg), torch.cuda.get_device_properties(device).total_memory, n)

        # FGSM and PGD run as two calls (make_balanced_batch): the larger one is what a chunk bounds.
        groups = self.plan(b.global_size).slice(b.lo, b.hi).groups
        attacked = max(int(((groups == 0) | (groups == 2)).sum()), int(((groups == 1) | (groups == 3)).sum()))
        return run_bounded(
            lambda: self._bounded(b, footprint),
            self.bounds,
            n,
            device,
            lambda: self.optimizer.zero_grad(set_to_none=True),
            fits,
            self.session.say,
            attacked=attacked,
        )

    def _bounded(self, b: tr.Batch, footprint: Any) -> torch.Tensor:
        s, bounds = self.session, self.bounds
        x, y = s.batch(b)
        n = x.shape[0]
        bounds.resolve(n, s.device, footprint)
        gen = tr.batch_generator(s.device, s.seed, b.epoch, b.index, 2)
        plan = self.plan(b.global_size)
        with s.autocast():
            x_in = tr.make_balanced_batch(
                self.attacked,
                x,
                y,
                plan.slice(b.lo, b.hi),
                self.cfg.attacks,
                gen,
                global_plan=plan,
                offset=b.lo,
                eps_scale=self.eps_scale,
                chunk=bounds.attack_chunk,
            )
        noise = torch.randn((b.global_size, self.purifier.spec.fjoint), generator=gen, device=s.device)[b.lo : b.hi]

        def step(part: slice) -> torch.Tensor:
            with s.autocast():
                with torch.no_grad():
                    _, representation = forward_with_representation(
                        self.classifier, self.layers, x_in[part], keep_graph=False
                    )
                x_hat, mu, logvar = self.train_pass(x_in[part], representation, noise[part])
            loss = tr.vae_loss(x_hat, x[part], mu, logvar, self.beta)
            (loss.total * self.loss_scale(b.global_size)).backward()
            return torch.stack([loss.total.detach(), loss.bce.detach(), loss.kl.detach()]).double()

        # Every rank cuts its rows into the same number of micro-batches (SyncBatchNorm, DDP: bounds.pieces).
        parts = pieces(b.global_size, s.ctx.world_size, bounds.micro_batch)
        sums = tr.accumulate(n, bounds.micro_batch, step, s.no_sync(self.module), parts=parts)
        return torch.cat([sums, torch.tensor([float(n)], device=s.device, dtype=torch.float64)])
