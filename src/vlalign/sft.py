"""Supervised fine-tuning of a LLaVA model on images + multi-turn conversations.

    python src/train.py fit --config conf/sft.yaml

The loss is the mean negative log-likelihood of the assistant tokens (prompt, image and padding tokens are
masked out):

    L = - (1 / N) * sum_{b, t : labels[b, t] != -100} log p(labels[b, t] | tokens[b, < t], images[b])

with N the number of trained tokens in the batch. Vision-LLM-Alignment's SFT stage (projector training after
composing a new LLaVA) is this module with ``train_projector: true``.
"""

from __future__ import annotations

import torch

from .backbone import Backbone
from .module import AlignModule


def lm_loss(backbone: Backbone, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean NLL over trained tokens, number of trained tokens) of an ``sft`` batch."""
    hidden = backbone.hidden_states(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"])
    labels = batch["labels"][:, 1:]
    logps = backbone.token_logps(hidden[:, :-1], labels).logps
    n = (labels != -100).sum()
    return -logps.sum() / n.clamp(min=1), n


class SFTModule(AlignModule):
    """Supervised fine-tuning on ``sft`` batches (``AlignModule``'s arguments: backbone, optim, export_dir)."""

    def batch_spec(self) -> dict:
        return {"format": "sft"}

    def step(self, batch):
        loss, n = lm_loss(self.backbone, batch)
        return loss, {"target_tokens": n.float()}

    def validation_step(self, batch, batch_idx):
        loss, n = lm_loss(self.backbone, batch)
        # weighted by trained tokens, so the epoch value is the token-level NLL of the whole validation set
        self.log_metrics({"loss": loss}, batch, batch_size=max(1, int(n)))
