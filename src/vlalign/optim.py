"""One optimizer with parameter groups per backbone part, and a warmup + decay schedule.

DeepSpeed accepts a single optimizer, so everything that trains (LoRA weights, projector, a value head, ...) goes
into one AdamW with a group per part; SIMA, for example, trains the projector at 2e-5 beside LoRA at 1e-7.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule.

    Args:
        lr: learning rate of the language model (its LoRA weights, or all its weights without LoRA).
        projector_lr: learning rate of the multimodal projector (default: ``lr``).
        vision_lr: learning rate of the vision tower when it trains (default: ``lr``).
        head_lr: learning rate of an algorithm's own parts (the reward model's value head; PPO's critic, its LoRA or
            language model and value head; default: ``lr``).
        weight_decay: decoupled weight decay (not applied to biases and norms).
        betas: Adam betas.
        eps: Adam epsilon.
        schedule: ``"cosine"``, ``"linear"`` (decay to ``min_lr_ratio * lr``) or ``"constant"`` after warmup.
        warmup_steps: linear warmup steps (takes precedence over ``warmup_ratio``).
        warmup_ratio: warmup as a fraction of the total optimizer steps.
        min_lr_ratio: final learning rate as a fraction of the peak.
    """

    lr: float = 1e-4
    projector_lr: Optional[float] = None
    vision_lr: Optional[float] = None
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', got {self.schedule!r}")


def param_groups(named: Iterable[tuple[str, str, torch.nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    """Groups from (part, name, parameter) triples; parts: language, projector, vision, head."""
    lrs = {"language": cfg.lr, "projector": cfg.projector_lr or cfg.lr, "vision": cfg.vision_lr or cfg.lr,
           "head": cfg.head_lr or cfg.lr}
    groups: dict[tuple[str, bool], dict] = {}
    for part, name, p in named:
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "norm" not in name.lower()
        g = groups.setdefault((part, decay), {"params": [], "lr": lrs[part], "name": f"{part}{'' if decay else '_no_decay'}",
                                              "weight_decay": cfg.weight_decay if decay else 0.0})
        g["params"].append(p)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (check the backbone's train_* and lora)")
    return list(groups.values())


def lr_lambda(step: int, total: Optional[int], warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or not total:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module, named: Iterable[tuple[str, str, torch.nn.Parameter]], cfg: OptimConfig):
    """What ``configure_optimizers`` returns: AdamW over the groups and a per-step LambdaLR."""
    opt = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    total = None
    trainer = getattr(module, "_trainer", None)
    if trainer is not None:
        est = trainer.estimated_stepping_batches
        total = int(est) if est != float("inf") else None
    if total is None and cfg.schedule != "constant":
        warnings.warn("the number of training steps is unknown (set trainer.max_steps): the learning rate stays "
                      "constant after warmup")
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * (total or 0))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total, warmup, cfg.schedule, cfg.min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
