"""KTO: alignment from unpaired feedback, each response marked desirable or undesirable.

    python src/train.py fit --config conf/kto.yaml

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", https://arxiv.org/abs/2402.01306.
For a prompt x with response y and its label:

    r(x, y) = log pi(y|x) - log pi_ref(y|x)                                         (batch,)   summed log-probs
    z0      = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])               ()  y'_i: another example's
                                                                                       response, from every rank
    L       = lambda_D (1 - sigmoid(beta (r - z0)))  if y is desirable
              lambda_U (1 - sigmoid(beta (z0 - r)))  if y is undesirable

The batches are ``unpaired`` (``data.collate``): ``unpaired`` records, or ``preference`` records split into a
desirable and an undesirable example (TRL's ``unpair_preference_dataset``). Each prompt is packed once with its own
response and the mismatched one (the previous example's, as in TRL), so the KL estimate costs no second pass over
the image and prompt. Set ``desirable_weight`` / ``undesirable_weight`` so that lambda_D n_D / (lambda_U n_U) lies in
[1, 4/3] when the two kinds are unbalanced (the paper's recommendation).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .backbone import BackboneConfig
from .logps import pair_image_features, pair_logps
from .losses import kto_loss, kto_reference_point, masked_mean
from .module import CONFIG_KEY, AlignModule, is_number, require
from .optim import OptimConfig
from .reference import Reference


class KTOModule(AlignModule):
    """KTO on ``unpaired`` batches.

    Args:
        backbone: the policy (usually an SFT checkpoint with LoRA).
        optim: optimizer and schedule.
        beta: the KL strength beta (0.1 in the paper).
        desirable_weight: lambda_D, the weight of desirable examples.
        undesirable_weight: lambda_U, the weight of undesirable examples.
        reference: ``adapter`` (the policy with LoRA off) or ``copy`` (a frozen copy), see ``reference.py``; the KL
            estimate scores responses of other prompts, so stored (precomputed) reference log-probs cannot serve.
        reference_backbone: the reference model for ``copy`` (default: the policy's source, frozen).
        layout: ``packed`` (prompt once per example) or ``plain``.
        export_dir: export the trained policy there at the end of ``fit``.
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(lr=5e-4),
                 beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 reference: str = "adapter", reference_backbone: Optional[BackboneConfig] = None,
                 layout: str = "packed", export_dir: Optional[str] = None):
        require(is_number(beta) and 0 < beta < math.inf, "beta", "> 0", beta)
        for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            require(is_number(weight) and 0 <= weight < math.inf, name, ">= 0", weight)
        require(reference in ("adapter", "copy"), "reference",
                "adapter | copy (KTO's KL estimate needs a live reference)", reference)
        require(layout in ("packed", "plain"), "layout", "packed | plain", layout)
        if reference_backbone is not None:
            reference_backbone.validate(f"{CONFIG_KEY}.reference_backbone")
        super().__init__(backbone, optim, export_dir)
        self.beta, self.layout = beta, layout
        self.weights = (desirable_weight, undesirable_weight)
        self.reference = Reference(reference, backbone, reference_backbone)

    def batch_spec(self) -> dict:
        return {"format": "unpaired", "layout": self.layout}

    def build(self, deepspeed_config):
        self.reference.build(deepspeed_config)

    def step(self, batch: dict):
        feats = pair_image_features(self.backbone, batch)
        pol = pair_logps(self.backbone, batch, feats)          # (batch, 2): own response, mismatched response
        ref = self.reference.logps(self.backbone, batch, feats)
        logratios = pol.sum - ref.sum.to(pol.sum.dtype)         # (batch, 2)
        mismatched = logratios[:, 1].detach()
        if self._trainer is not None and self.trainer.world_size > 1:  # ranks' batches may differ in size
            total = self.all_gather(torch.stack([mismatched.sum(), mismatched.new_tensor(len(mismatched))]))
            mismatched = (total[..., 0].sum() / total[..., 1].sum()).reshape(1)
        z0 = kto_reference_point(mismatched)
        desirable = batch["desirable"]
        losses = kto_loss(logratios[:, 0], desirable, z0, self.beta, *self.weights)
        rewards = self.beta * logratios[:, 0].detach()
        metrics = {"kl": z0, "logps/desirable": masked_mean(pol.sum[:, 0].detach(), desirable),
                   "logps/undesirable": masked_mean(pol.sum[:, 0].detach(), ~desirable),
                   "rewards/desirable": masked_mean(rewards, desirable),
                   "rewards/undesirable": masked_mean(rewards, ~desirable),
                   "desirable_fraction": desirable.float().mean()}
        return losses.mean(), metrics
