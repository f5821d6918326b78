"""DeepSpeed ZeRO-3 helpers: knowing when parameters are partitioned, and initialising or loading them whole.

Under ZeRO-3, Lightning builds the model inside ``deepspeed.zero.Init`` (our modules build it in
``configure_model``), so every parameter is split across ranks as it is created and a rank holds an empty
placeholder. Anything that writes weights after creation (a seeded initialisation, loading a head, peft's LoRA
init) must do it on the gathered parameters, and transformers must know about the config to load a checkpoint
into the partitions. Everything here is a no-op without ZeRO-3, and deepspeed is imported only when it is
already in use (importing it prints warnings and costs seconds).

This module imports nothing from the project: ``backbone.py`` and the algorithms use it.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Optional

import torch
from torch import nn


def inside_zero_init() -> bool:
    """True while DeepSpeed ZeRO-3's ``zero.Init`` partitions modules as they are created."""
    if "deepspeed" not in sys.modules:  # nothing can be partitioning (and importing it would print warnings)
        return False
    from deepspeed.runtime.zero import partition_parameters

    return partition_parameters.zero_init_context > 0


def partitioned(module: nn.Module) -> bool:
    """True when ``module``'s parameters are ZeRO-3 partitions."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered(params: Iterable[nn.Parameter], modify: bool = True):
    """Context in which ZeRO-3 partitioned ``params`` are whole on every rank; a no-op for ordinary parameters.

    With ``modify``, rank 0's in-place edits are kept and broadcast when the context exits (initialising or
    copying weights created inside ``deepspeed.zero.Init``). Collective: every rank must enter it.
    """
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def deepspeed_config_of(trainer) -> Optional[dict]:
    """The DeepSpeed config of a trainer running ZeRO stage 3, else None."""
    strategy = getattr(trainer, "strategy", None)
    if getattr(strategy, "zero_stage_3", False):
        return strategy.config
    return None


@contextlib.contextmanager
def zero3_loading(deepspeed_config: Optional[dict]):
    """Let transformers know about ZeRO-3 while loading, so checkpoint weights go into partitioned parameters."""
    if not (inside_zero_init() and deepspeed_config):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(deepspeed_config)  # registered through a weak reference: hold it while loading
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


@contextlib.contextmanager
def seeded(seed: int):
    """Run with torch's global RNG seeded, restoring its state afterwards (initialisation that does not depend
    on what ran before, and does not disturb what runs after)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
