"""The shared training pieces: schedules, adversarially-balanced batches, VAE loss, Lookahead,
training-state files, and the epoch loop both ``train-purifier`` and ``train-classifier`` use.

Conventions (all documented here once):

- **Epochs count from 0.** ``lr_at_epoch(t, e)`` and ``beta_at_epoch(t, e)`` are the values used for the
  whole of epoch ``e`` (the LR scheduler is stepped after each epoch, Table 16). With the cifar10 preset
  (warm-up 25, plateau 25, annealing 150): epoch 0 runs at the initial LR 5e-9, epochs 25–49 at the
  plateau LR 0.064, and epoch 199, the last, at the final LR 4.346e-4; β is 0 up to epoch 25, rises
  linearly, and is 1 from epoch 34 on (β-increase epochs 25 and 34, Table 16).
- **Every random draw of a training step is a function of (seed, epoch, batch)**: the data order of an
  epoch, the PGD random starts and the VAE's reparameterisation noise are drawn for the *global* batch
  from generators seeded so, then sliced for the local rank. Hence N processes compute what one
  process with the global batch computes, and a run resumed mid-epoch continues exactly as an
  uninterrupted one. Data augmentation (when a preset turns it on) is torchvision's, seeded per example
  by (seed, epoch, dataset index): the same in 1 or N processes, with or without loader workers, and
  after a mid-epoch resume.
- Checkpoints are safetensors: tensors (model, flattened optimiser state, Lookahead slow weights, RNG
  states as uint8) plus a JSON header (position, config, format version), written atomically.
"""

from carso_cli.training.accumulate import accumulate
from carso_cli.training.batches import (
    ATTACK_GROUPS,
    CLEAN,
    BalancedPlan,
    adversarial_count,
    attack_strengths,
    balanced_batch_plan,
    make_balanced_batch,
)
from carso_cli.training.batchnorm import CrossRankBatchNorm, convert_sync_batchnorm
from carso_cli.training.lookahead import Lookahead
from carso_cli.training.loop import (
    Batch,
    LoopHooks,
    LoopSpec,
    TrainingInterrupted,
    local_batches,
    run_loop,
)
from carso_cli.training.loss import VAELoss, vae_loss
from carso_cli.training.metrics import append_metrics, read_metrics, truncate_metrics
from carso_cli.training.randomness import (
    batch_generator,
    capture_rng,
    derived_seed,
    epoch_batches,
    gather_rng,
    restore_rng,
    seed_everything,
)
from carso_cli.training.schedules import beta_at_epoch, cosine_lr, lr_at_epoch
from carso_cli.training.signals import StopSignal
from carso_cli.training.state import (
    STATE_FORMAT,
    STATE_FORMAT_VERSION,
    Position,
    TrainingState,
    check_resume,
    finished_run,
    load_optimizer_state,
    load_training_state,
    restore_rank_rng,
    save_training_state,
)

__all__ = [
    "accumulate",
    "ATTACK_GROUPS",
    "CLEAN",
    "STATE_FORMAT",
    "STATE_FORMAT_VERSION",
    "BalancedPlan",
    "Batch",
    "CrossRankBatchNorm",
    "Lookahead",
    "LoopHooks",
    "LoopSpec",
    "Position",
    "StopSignal",
    "TrainingInterrupted",
    "TrainingState",
    "VAELoss",
    "adversarial_count",
    "append_metrics",
    "attack_strengths",
    "balanced_batch_plan",
    "batch_generator",
    "beta_at_epoch",
    "capture_rng",
    "check_resume",
    "convert_sync_batchnorm",
    "cosine_lr",
    "derived_seed",
    "epoch_batches",
    "gather_rng",
    "finished_run",
    "load_optimizer_state",
    "load_training_state",
    "local_batches",
    "lr_at_epoch",
    "make_balanced_batch",
    "read_metrics",
    "restore_rank_rng",
    "restore_rng",
    "run_loop",
    "save_training_state",
    "seed_everything",
    "truncate_metrics",
    "vae_loss",
]
