"""The reference policy pi_ref of the algorithms that regularise towards one (the DPO family, KTO, PPO).

    reference = Reference("adapter", policy_config)     # in __init__
    reference.build(deepspeed_config)                   # in build()
    ref = reference.logps(self.backbone, batch, image_features)   # PairLogps, never a graph

It is held one of four ways (``mode``):

* ``adapter``: the policy with its LoRA adapter disabled: no extra weights in memory (SIMA's choice). A trained
  projector stays on in that pass, as in SIMA.
* ``copy``: a separate frozen model (for full fine-tuning; SeVa, Vision-LLM-Alignment): ``backbone`` or, by
  default, the policy's own source without LoRA (``BackboneConfig.frozen_copy()``).
* ``precomputed``: log-probs stored in the shards by ``data_prep/precompute_ref.py`` (mllm-dpo's way): no
  reference forward runs during training.
* ``none``: no reference (reference-free losses: SimPO, CPO, ORPO); ``logps`` refuses to run.

The policy's image features are reused by the reference pass whenever the two see the same images through the
same frozen vision tower and projector.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .backbone import Backbone, BackboneConfig
from .logps import PairLogps, pair_logps

MODES = ("adapter", "copy", "precomputed", "none")


class Reference(nn.Module):
    """pi_ref (see the module docstring). Its model, when it has one, stays in eval mode and never trains.

    Args:
        mode: ``adapter``, ``copy``, ``precomputed`` or ``none``.
        policy: the policy's backbone config (``adapter`` checks it has LoRA; ``copy`` copies its source).
        backbone: the reference model for ``copy`` (default: ``policy.frozen_copy()``).
    """

    def __init__(self, mode: str, policy: BackboneConfig, backbone: Optional[BackboneConfig] = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"reference must be one of {MODES}, got {mode!r}")
        if mode == "adapter" and policy.lora.r == 0 and policy.adapter is None:
            raise ValueError("reference 'adapter' needs LoRA on the policy (backbone.lora.r > 0); use 'copy' for "
                             "full fine-tuning")
        if backbone is not None and mode != "copy":
            raise ValueError(f"reference_backbone is only used by reference 'copy', not {mode!r}")
        self.mode = mode
        self.shares_images = backbone is None  # a copy of the policy's own source has the policy's vision weights
        self.backbone = Backbone(backbone or policy.frozen_copy()) if mode == "copy" else None

    def build(self, deepspeed_config: Optional[dict] = None):
        if self.backbone is not None:
            self.backbone.build(deepspeed_config)
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone is not None:
            self.backbone.eval()  # no dropout in the reference, whatever the policy does
        return self

    @torch.no_grad()
    def logps(self, policy: Backbone, batch: dict, image_features: Optional[torch.Tensor] = None,
              keep_logits: bool = False) -> PairLogps:
        """Reference log-probs of every response of a ``pairs`` batch; never builds a graph.

        policy: the policy's backbone (the ``adapter`` reference runs it with LoRA off). image_features: the
        policy's ``pair_image_features`` of this batch, reused when the reference sees them identically.
        """
        if self.mode == "none":
            raise RuntimeError("this algorithm runs without a reference (reference: none)")
        if self.mode == "precomputed":
            if "ref_logps_sum" not in batch:
                raise ValueError("reference 'precomputed' needs shards with ref_logps: run data_prep/precompute_ref.py")
            return PairLogps(sum=batch["ref_logps_sum"], mean=batch["ref_logps_mean"],
                             tokens=batch["response_lengths"])
        same_images = image_features is not None and policy.vision_frozen
        if self.mode == "adapter":
            with policy.adapter_disabled():
                return pair_logps(policy, batch, image_features.detach() if same_images else None, keep_logits)
        share = same_images and self.shares_images
        return pair_logps(self.backbone, batch, image_features.detach() if share else None, keep_logits)

    @property
    def runs_forward(self) -> bool:
        """True when ``logps`` runs a model (for the Benchmark callback's FLOP count)."""
        return self.mode in ("adapter", "copy")
