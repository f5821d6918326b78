"""Test-only: Lightning's DeepSpeed strategy on CPU processes, so CI (no GPU) exercises the ZeRO code paths.

Lightning refuses ``strategy="deepspeed"`` without CUDA; this subclass skips that check and uses gloo. It is
never used for training: on GPUs use ``strategy: deepspeed_stage_2`` / ``deepspeed_stage_3``.
"""

import os

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own version refuses non-CUDA accelerators

    def setup_distributed(self) -> None:
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # (skips the CUDA device-index validation)

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)

    def _get_process_group_backend(self) -> str:
        return "gloo"
