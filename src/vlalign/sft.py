"""Supervised fine-tuning of a LLaVA model on images + multi-turn conversations.

    python src/train.py fit --config conf/sft.yaml

The loss is the mean negative log-likelihood of the assistant tokens (prompt, image and padding tokens are
masked out):

    L = - (1 / N) * sum_{b, t : labels[b, t] != -100} log p(labels[b, t] | tokens[b, < t], images[b])

with N the number of trained tokens in the batch. Vision-LLM-Alignment's SFT stage (projector training after
composing a new LLaVA) is this module with ``train_projector: true``.
"""

from __future__ import annotations

from typing import Optional

import lightning as L
import torch

from .backbone import Backbone, BackboneConfig, deepspeed_config_of
from .checkpoint import export_backbone, keep_trainable
from .optim import OptimConfig, build_optimizer


def lm_loss(backbone: Backbone, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL over trained tokens, number of trained tokens) of an ``sft`` batch."""
    hidden = backbone.hidden_states(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
    labels = batch["labels"][:, 1:]
    logps = backbone.token_logps(hidden[:, :-1], labels)
    n = (labels != -100).sum()
    return -logps.sum() / n.clamp(min=1), n


class SFTModule(L.LightningModule):
    """Supervised fine-tuning on ``sft`` batches.

    Args:
        backbone: the LLaVA to train (source, frozen parts, LoRA, checkpointing).
        optim: optimizer and schedule.
        export_dir: when set, the trained model is exported there at the end of ``fit``: a merged checkpoint
            (``merged/``, loads with plain transformers) and, with LoRA, the adapter (``adapter/``).
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(),
                 export_dir: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters()
        self.backbone = Backbone(backbone)
        self.optim, self.export_dir = optim, export_dir
        self.tokens_seen = 0
        self.strict_loading = False  # checkpoints hold the trainable weights only

    def batch_spec(self) -> dict:
        return {"format": "sft"}

    def configure_model(self):
        self.backbone.build(deepspeed_config_of(self._trainer))

    def configure_optimizers(self):
        return build_optimizer(self, self.backbone.named_trainable(), self.optim)

    def training_step(self, batch, batch_idx):
        loss, n = lm_loss(self.backbone, batch)
        self.tokens_seen += int(batch["attention_mask"].sum())
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/tokens_seen", float(self.tokens_seen), batch_size=bs)
        self.log("train/target_tokens", n.float(), batch_size=bs)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, n = lm_loss(self.backbone, batch)
        # weight by trained tokens so the epoch value is the token-level NLL of the whole validation set
        self.log("val/loss", loss, prog_bar=True, batch_size=int(n), sync_dist=True)

    def on_save_checkpoint(self, checkpoint):
        keep_trainable(self, checkpoint)
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

    def on_fit_end(self):
        export_backbone(self, self.export_dir)
