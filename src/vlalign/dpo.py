"""Direct preference optimisation of a LLaVA model on image preference pairs (or ranked lists).

    python src/train.py fit --config conf/dpo.yaml

For a prompt x (image + question) with responses ranked y_0 > y_1 (> ... > y_{k-1}):

    logratio_i = log pi(y_i | x) - log pi_ref(y_i | x)                      (batch, k)
    L          = loss_fn(logratio, beta)   e.g. sigmoid DPO: -log sigmoid(beta (logratio_0 - logratio_1))

with the loss chosen by name from ``losses.PREFERENCE_LOSSES`` and log pi either summed over the response
tokens (``logp: sum``, standard) or averaged (``logp: mean``, mllm-dpo's "use average", IPO).

The reference pi_ref is held one of three ways (``reference``):

* ``adapter``: the policy with its LoRA adapter disabled: no extra weights in memory (SIMA's choice). A trained
  projector stays on in that pass, as in SIMA.
* ``copy``: a separate frozen model (for full fine-tuning; SeVa, Vision-LLM-Alignment), from
  ``reference_backbone`` or, by default, the policy's own source without LoRA.
* ``precomputed``: log-probs stored in the shards by ``data_prep/precompute_ref.py`` (mllm-dpo's way): no
  reference forward runs during training.

The pair's image and prompt are computed once (``layout: packed``: one sequence [prompt | chosen | rejected]
with a block mask) and the image features are computed once per pair and reused by the reference pass when the
vision tower and projector are frozen. ``layout: plain`` runs each [prompt | response] on its own (the oracle).
"""

from __future__ import annotations

import inspect
from typing import Optional

import lightning as L
import torch

from .backbone import Backbone, BackboneConfig, deepspeed_config_of
from .callbacks import forward_flops
from .checkpoint import export_backbone, keep_trainable
from .logps import pair_image_features, pair_logps
from .losses import PREFERENCE_LOSSES, dpo_rewards, noisy_rejected_token_logps
from .optim import OptimConfig, build_optimizer

REFERENCES = ("adapter", "copy", "precomputed")


class DPOModule(L.LightningModule):
    """DPO and its family on ``pairs`` batches.

    Args:
        backbone: the policy (usually an SFT checkpoint with LoRA).
        optim: optimizer and schedule.
        loss: a name in ``losses.PREFERENCE_LOSSES``: ``sigmoid``, ``conservative``, ``ipo``, ``hinge``, ``rpo``,
            ``plackett_luce``.
        beta: the KL-strength / inverse temperature beta.
        loss_params: extra parameters of the chosen loss (``label_smoothing`` for conservative, ``alpha`` for rpo).
        logp: ``sum`` (standard) or ``mean`` (length-normalised) response log-probs.
        reference: ``adapter``, ``copy`` or ``precomputed`` (see the module docstring).
        reference_backbone: the reference model for ``copy`` (default: the policy's source, without LoRA, frozen).
        layout: ``packed`` (shared prefix computed once per pair) or ``plain``.
        num_responses: 2 for chosen/rejected pairs; k > 2 trains on the first k ranked candidates (use
            ``loss: plackett_luce``).
        rejected_scoring: ``standard``, or ``noisy``: SIMA/POVID's non-standard scoring of the rejected side by the
            model's own top-1 (top-2 where top-1 is the label) token log-probs instead of the rejected tokens.
        export_dir: export the trained policy there at the end of ``fit`` (``merged/`` and ``adapter/``).
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(lr=5e-4),
                 loss: str = "sigmoid", beta: float = 0.1, loss_params: Optional[dict] = None, logp: str = "sum",
                 reference: str = "adapter", reference_backbone: Optional[BackboneConfig] = None,
                 layout: str = "packed", num_responses: int = 2, rejected_scoring: str = "standard",
                 export_dir: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters()
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"loss must be one of {sorted(PREFERENCE_LOSSES)}, got {loss!r}")
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if logp not in ("sum", "mean"):
            raise ValueError(f"logp must be 'sum' or 'mean', got {logp!r}")
        if layout not in ("packed", "plain"):
            raise ValueError(f"layout must be 'packed' or 'plain', got {layout!r}")
        if rejected_scoring not in ("standard", "noisy"):
            raise ValueError(f"rejected_scoring must be 'standard' or 'noisy', got {rejected_scoring!r}")
        if rejected_scoring == "noisy" and (num_responses != 2 or reference == "precomputed"):
            raise ValueError("noisy rejected scoring needs pairs (num_responses 2) and an online reference")
        if reference == "adapter" and backbone.lora.r == 0 and backbone.adapter is None:
            raise ValueError("reference 'adapter' needs LoRA on the policy (backbone.lora.r > 0); use 'copy' for "
                             "full fine-tuning")
        self.loss_fn = PREFERENCE_LOSSES[loss]
        self.loss_params = dict(loss_params or {})
        self.wants_nll = "chosen_nll" in inspect.signature(self.loss_fn).parameters
        self.beta, self.logp, self.reference, self.layout = beta, logp, reference, layout
        self.num_responses, self.rejected_scoring, self.optim, self.export_dir = (
            num_responses, rejected_scoring, optim, export_dir)
        self.backbone = Backbone(backbone)
        self.ref_backbone = None
        if reference == "copy":
            ref_cfg = reference_backbone or _frozen_copy_of(backbone)
            self.ref_backbone = Backbone(ref_cfg)
        self.strict_loading = False  # checkpoints hold the trainable weights only

    # ------------------------------------------------------------------------------------------------- setup
    def batch_spec(self) -> dict:
        return {"format": "pairs", "layout": self.layout, "num_responses": self.num_responses}

    def configure_model(self):
        self.backbone.build(deepspeed_config_of(self._trainer))
        if self.ref_backbone is not None:
            self.ref_backbone.build(deepspeed_config_of(self._trainer))
            self.ref_backbone.requires_grad_(False)
            self.ref_backbone.eval()

    def configure_optimizers(self):
        return build_optimizer(self, self.backbone.named_trainable(), self.optim)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref_backbone is not None:
            self.ref_backbone.eval()  # no dropout in the reference
        return self

    # ------------------------------------------------------------------------------------------------ compute
    def _scores(self, out: dict, batch: dict) -> dict:
        """Replace the rejected side's log-probs by SIMA/POVID's noisy scoring (the option, not the default)."""
        if self.rejected_scoring != "noisy":
            return out
        mask, logits = out["mask"], out["logits"]
        rows = torch.arange(mask.shape[0], device=mask.device) % 2 == 1  # response 1 of each pair
        full = logits.new_zeros(*mask.shape, logits.shape[-1])
        full[mask] = logits
        targets = batch["targets"]
        noisy = noisy_rejected_token_logps(full[rows], targets[rows])
        sums = out["sum"].clone()
        sums[:, 1] = noisy.sum(-1)
        means = out["mean"].clone()
        means[:, 1] = sums[:, 1] / out["tokens"][:, 1].clamp(min=1)
        return {**out, "sum": sums, "mean": means}

    def policy_logps(self, batch: dict, image_features=None) -> dict:
        out = pair_logps(self.backbone, batch, image_features, return_logits=self.rejected_scoring == "noisy")
        return self._scores(out, batch)

    @torch.no_grad()
    def reference_logps(self, batch: dict, image_features=None) -> dict:
        """Reference log-probs, (batch, k) ``sum`` and ``mean``; never builds a graph."""
        if self.reference == "precomputed":
            if "ref_logps_sum" not in batch:
                raise ValueError("reference 'precomputed' needs shards with ref_logps: run data_prep/precompute_ref.py")
            return {"sum": batch["ref_logps_sum"], "mean": batch["ref_logps_mean"]}
        if self.reference == "adapter":
            feats = image_features.detach() if image_features is not None and self.backbone.vision_frozen else None
            with self.backbone.adapter_disabled():
                out = pair_logps(self.backbone, batch, feats, return_logits=self.rejected_scoring == "noisy")
        else:
            share = image_features is not None and self.backbone.vision_frozen and self.hparams.reference_backbone is None
            out = pair_logps(self.ref_backbone, batch, image_features.detach() if share else None,
                             return_logits=self.rejected_scoring == "noisy")
        return self._scores(out, batch)

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        feats = pair_image_features(self.backbone, batch)
        pol = self.policy_logps(batch, feats)
        ref = self.reference_logps(batch, feats)
        key = self.logp
        logratios = pol[key] - ref[key].to(pol[key].dtype)  # (batch, k)
        params = dict(self.loss_params)
        if self.wants_nll:
            params["chosen_nll"] = -pol["mean"][:, 0]
        losses = self.loss_fn(logratios, self.beta, **params)
        rewards = dpo_rewards(logratios.detach(), self.beta)
        chosen, rejected = rewards[:, 0], rewards[:, -1]
        metrics = {
            "loss": losses.mean().detach(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": pol["sum"][:, 0].detach().mean(),
            "logps/rejected": pol["sum"][:, -1].detach().mean(),
        }
        return losses.mean(), metrics

    def training_step(self, batch, batch_idx):
        loss, metrics = self.forward_loss(batch)
        bs = batch["targets"].shape[0] // self.num_responses
        self.log_dict(metrics, prog_bar=False, batch_size=bs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, metrics = self.forward_loss(batch)
        bs = batch["targets"].shape[0] // self.num_responses
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=bs, sync_dist=True)

    def extra_forward_flops(self, batch: dict) -> float:
        """The reference pass, for the Benchmark callback (none when reference log-probs are precomputed)."""
        if self.reference == "precomputed":
            return 0.0
        lengths = (batch["segment_ids"] >= 0).sum(-1).tolist() if "segment_ids" in batch else \
            batch["attention_mask"].sum(-1).tolist()
        n_img = 0 if self.backbone.vision_frozen else int(batch["pixel_values"].shape[0]) if batch["pixel_values"].dim() == 4 else 0
        return forward_flops(self.backbone, lengths, n_img)

    def on_save_checkpoint(self, checkpoint):
        keep_trainable(self, checkpoint)

    def on_fit_end(self):
        export_backbone(self, self.export_dir)


def _frozen_copy_of(cfg: BackboneConfig) -> BackboneConfig:
    """The policy's source as a frozen reference: same weights, no LoRA, nothing trains, no checkpointing."""
    from dataclasses import replace

    from .backbone import LoraSpec

    return replace(cfg, lora=LoraSpec(r=0), adapter=cfg.adapter, train_vision=False, train_projector=False,
                   train_language=False, gradient_checkpointing=False)
