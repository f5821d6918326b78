"""The LightningCLI behind ``python src/train.py``: any LightningModule of this package with ``ShardDataModule``."""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

from .data.module import ShardDataModule


class AlignCLI(LightningCLI):
    """LightningCLI with the shard DataModule fixed and the algorithm chosen by ``model.class_path``."""

    def before_fit(self):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(args=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AlignCLI(model_class=None, datamodule_class=ShardDataModule, subclass_mode_model=True,
                    save_config_kwargs={"overwrite": True}, args=args)
