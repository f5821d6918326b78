"""One optimizer with parameter groups per backbone part, a warmup + decay schedule, and what a non-finite step does.

DeepSpeed accepts a single optimizer, so everything that trains (LoRA weights, projector, a value head, ...) goes
into one AdamW with a group per part; SIMA, for example, trains the projector at 2e-5 beside LoRA at 1e-7.

``nonfinite_flags`` is the cheap test behind ``AlignModule``'s non-finite guard (``optim.nonfinite``): one fused
max-abs per gradient, one host sync.
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
        nonfinite: what a step with a non-finite (NaN / inf) loss or gradient does, checked after backward and
            before the optimizer step. ``skip``: the step's gradients are dropped, so no weight (nor Adam's moments)
            changes; the learning-rate schedule still advances (it counts optimizer steps, like ``max_steps``), the
            step is counted (``train/skipped_steps``, saved in checkpoints) and a warning names the batch's sample
            ids. ``raise``: the run stops with an error naming the step, the sample ids and what was non-finite.
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
    nonfinite: str = "skip"

    def validate(self, key: str = "optim"):
        """Raise ``ValueError`` naming ``key.<field>`` (the dotted key as written in the YAML) for a value that cannot
        be right. The module's ``__init__`` calls it, before anything is built."""
        def bad(name, rule):
            return ValueError(f"{key}.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("lr", "projector_lr", "vision_lr", "head_lr"):
            value = getattr(self, name)
            if (value is not None or name == "lr") and not (_real(value) and 0 < value < math.inf):
                raise bad(name, "> 0" + (" or null (= lr)" if name != "lr" else ""))
        if not (_real(self.weight_decay) and 0 <= self.weight_decay < math.inf):
            raise bad("weight_decay", ">= 0")
        if len(self.betas) != 2 or not all(_real(b) and 0 <= b < 1 for b in self.betas):
            raise bad("betas", "two numbers in [0, 1)")
        if not (_real(self.eps) and 0 < self.eps < math.inf):
            raise bad("eps", "> 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", " | ".join(SCHEDULES))
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise bad("warmup_steps", "an integer >= 0")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not (_real(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                raise bad(name, "in [0, 1]")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise bad("nonfinite", " | ".join(NONFINITE_POLICIES))


SCHEDULES = ("cosine", "linear", "constant")
NONFINITE_POLICIES = ("skip", "raise")


def _real(x) -> bool:
    """A real number (NaN fails every comparison, so range checks written as ``lo <= x`` refuse it)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def nonfinite_flags(tensors: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """(n,) bool: True where a tensor (a gradient, a weight) holds a NaN or an infinity; False for ``None``.

    One fused max-abs per tensor (``torch._foreach_norm`` with ord inf, the kernel ``clip_grad_norm_`` uses; the
    max-abs, unlike the 2-norm, does not overflow for large finite values; NaN propagates), stacked into one tensor
    so that the caller reads it with one host sync.
    """
    present = [i for i, t in enumerate(tensors) if t is not None and t.numel()]
    if not present:
        return torch.zeros(len(tensors), dtype=torch.bool)
    norms = torch._foreach_norm([tensors[i] for i in present], math.inf)
    device = norms[0].device
    bad = ~torch.stack([n.to(device, torch.float32) for n in norms]).isfinite()
    flags = torch.zeros(len(tensors), dtype=torch.bool, device=device)
    return flags.index_copy(0, torch.tensor(present, device=device), bad)


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
