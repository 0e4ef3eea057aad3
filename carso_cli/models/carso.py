"""The defended model: classifier → representation → purifier decoder → classifier → aggregation.

``CARSO.forward`` is end-to-end differentiable (section 4.1): the representation is captured with its
autograd graph, the N×B reconstructions go through the classifier in one batched call, and the robust
aggregation (section 4.5) returns finite scores. Attacks must always see this whole module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from carso_cli.aggregation import aggregate, probabilities
from carso_cli.models.purifier import Purifier
from carso_cli.models.representation import forward_with_representation

# (n_samples, batch_size, fjoint, device, dtype) → z of shape (n_samples, batch_size, fjoint)
LatentSampler = Callable[[int, int, int, torch.device, torch.dtype], torch.Tensor]


def standard_normal_sampler(n: int, b: int, d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, b, d, device=device, dtype=dtype)


class CARSO(nn.Module):
    """CARSO inference model.

    Args:
        classifier: the (adversarially-trained) classifier, inputs in [0, 1].
        purifier: a trained purifier (only its condition encoder and decoder are used).
        samples: reconstructions per input; 0 = one deterministic reconstruction from z = 0.
        aggregation: "dexp" (paper), "logit", "prob" or "vote" (ablation, appendix B.2).
        final_classifier: classifier applied to the reconstructions (the later version's Table 17
            ablation); defaults to ``classifier``.
    """

    def __init__(
        self,
        classifier: nn.Module,
        purifier: Purifier,
        samples: int = 8,
        aggregation: str = "dexp",
        final_classifier: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.purifier = purifier
        self.final_classifier = final_classifier  # None → the same classifier
        self.layers: list[str] = list(purifier.spec.layers)
        self.samples = samples
        self.aggregation = aggregation
        # Replaceable source of z: evaluation seeds it per example so results do not depend on batching.
        self.latent_sampler: LatentSampler = standard_normal_sampler
        self.last_reconstructions: torch.Tensor | None = None  # (N, B, C, H, W), kept if keep_reconstructions
        self.keep_reconstructions = False

    @property
    def num_classes(self) -> int:
        return self.purifier.spec.num_classes

    def sample_latent(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        d = self.purifier.spec.fjoint
        if self.samples == 0:
            return torch.zeros(1, batch_size, d, device=device, dtype=dtype)  # the prior's mean
        return self.latent_sampler(self.samples, batch_size, d, device, dtype)

    def reconstruct(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1] → reconstructions (N, B, C, H, W), differentiable w.r.t. x."""
        _, representation = forward_with_representation(self.classifier, self.layers, x, keep_graph=True)
        if z is None:
            z = self.sample_latent(x.shape[0], x.device, representation[0].dtype)
        return self.purifier.sample(representation, z)

    def reconstruction_logits(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, B, classes) of the final classifier on the N reconstructions of each input."""
        x_hat = self.reconstruct(x, z)
        if self.keep_reconstructions:
            self.last_reconstructions = x_hat.detach()
        n, b = x_hat.shape[:2]
        final = self.final_classifier if self.final_classifier is not None else self.classifier
        logits = final(x_hat.reshape(n * b, *x_hat.shape[2:]))  # one batched call, no loop over samples
        return logits.view(n, b, -1)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) in [0, 1] → aggregated scores (B, classes): finite, argmax = prediction."""
        return aggregate(self.reconstruction_logits(x, z), self.aggregation)

    def predict_proba(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities (B, classes) of the aggregated prediction."""
        return probabilities(self.forward(x, z), self.aggregation)


def set_eval_frozen(*modules: nn.Module | None) -> None:
    """Eval mode and no parameter gradients: attacks differentiate w.r.t. the input only."""
    for module in modules:
        if module is None:
            continue
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
