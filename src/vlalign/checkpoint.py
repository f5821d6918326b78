"""What a Lightning checkpoint keeps, and exporting a trained backbone.

A LoRA run's checkpoint needs only the weights that train (the rest is rebuilt from the config: the same local
checkpoint, or the tiny default's seeded initialisation), so ``keep_trainable`` drops frozen weights and frozen
reference models from ``checkpoint["state_dict"]``. Modules that use it set ``strict_loading = False``.
"""

from __future__ import annotations

import os
from typing import Optional

import lightning as L

from .zero import gathered


def keep_trainable(module: L.LightningModule, checkpoint: dict):
    """Drop the frozen parameters from a checkpoint's state dict (buffers are kept)."""
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    sd = checkpoint.get("state_dict")
    if sd is None:
        return
    for key in list(sd):
        if key in frozen and key not in trainable:
            del sd[key]


def export_backbone(module: L.LightningModule, export_dir: Optional[str]):
    """Export ``module.backbone``: a merged checkpoint (``merged/``) and, with LoRA, the adapter (``adapter/``).

    Written by global rank 0. Under DeepSpeed ZeRO-3 the sharded weights are gathered first (every rank takes
    part in the gather).
    """
    if not export_dir:
        return
    bb = module.backbone
    with gathered(bb.parameters(), modify=False):
        if module.trainer.global_rank == 0:
            bb.export_merged(os.path.join(export_dir, "merged"))
            if bb.has_adapter:
                bb.export_adapter(os.path.join(export_dir, "adapter"))
            print(f"exported to {export_dir}")
