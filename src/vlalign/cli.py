"""The LightningCLI behind ``python src/train.py``: any LightningModule of this package with ``ShardDataModule``."""

from __future__ import annotations

import os
from typing import Optional

import torch
from lightning.pytorch.cli import LightningCLI

from .data.module import ShardDataModule


class AlignCLI(LightningCLI):
    """LightningCLI with the shard DataModule fixed and the algorithm chosen by ``model.class_path``.

    Adds ``torch_threads``: intra-op CPU threads of the training process (``null``: torch's default, one per
    core). The embedded default sets 1: on a small CPU the DataLoader worker and several torch threads
    oversubscribe the cores, which was measured here to slow the tiny model's steps by more than 10x.
    """

    def add_arguments_to_parser(self, parser):
        parser.add_argument("--torch_threads", type=Optional[int], default=None,
                            help="intra-op CPU threads (null: torch's default)")

    def before_instantiate_classes(self):
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        threads = cfg.get("torch_threads")
        if threads:
            torch.set_num_threads(int(threads))


def main(args=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AlignCLI(model_class=None, datamodule_class=ShardDataModule, subclass_mode_model=True,
                    save_config_kwargs={"overwrite": True}, args=args)
