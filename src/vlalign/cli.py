"""The LightningCLI behind ``python src/train.py``: any LightningModule of this package with ``ShardDataModule``.

Runs and resuming. The shipped configs give each run a stable directory, ``runs/<name>/`` (the TensorBoard logger's
``version: ""``): its events, ``config.yaml``, ``hparams.yaml`` and ``checkpoints/`` (``last.ckpt`` and the best
``step<N>.ckpt``). Rerunning the same command with ``--ckpt_path last`` resumes from that run's ``last.ckpt``
(Lightning looks for ``last*.ckpt`` in each ``ModelCheckpoint``'s directory and takes the newest; with none it
warns and starts from scratch, so a job script can always pass it). Rerunning WITHOUT ``--ckpt_path`` when the
run's checkpoint directory already holds checkpoints is refused (it would mix two runs' events and overwrite the
checkpoints): resume, pick another ``--trainer.logger.init_args.name``, or delete the directory.
``--trainer.logger.init_args.version null`` brings back Lightning's fresh ``version_N`` per run.

Checkpoints are written by ``AtomicCheckpointIO`` (``checkpoint.py``): in the target directory, fsync'ed and
renamed, so a kill leaves the previous checkpoint loadable; installed unless the config names another checkpoint IO.
``--trainer.strategy deepspeed_stage_N`` becomes ``AtomicDeepSpeedStrategy`` (its checkpoint directories are
swapped in whole).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .checkpoint import AtomicCheckpointIO, atomic_strategy, remove_stale_temps
from .data.module import ShardDataModule


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def names_checkpoint_io(plugins, strategy_config) -> bool:
    """True when the trainer config already chooses a checkpoint IO: an instance among ``plugins`` (instantiated)
    or ``checkpoint_io`` in the strategy's ``init_args`` (as parsed, before instantiation)."""
    if any(isinstance(p, CheckpointIO) for p in _as_list(plugins)):
        return True
    init_args = getattr(strategy_config, "init_args", None) or {}
    get = init_args.get if hasattr(init_args, "get") else lambda k: getattr(init_args, k, None)
    return get("checkpoint_io") is not None


def checkpoint_dirs(trainer: L.Trainer) -> list[str]:
    """Where each ``ModelCheckpoint`` of ``trainer`` will write, resolved as Lightning documents it (before ``fit``
    sets ``dirpath``): its ``dirpath``; else ``<logger save_dir>/<name>/<version>/checkpoints`` of the first logger
    (an int version is ``version_<N>``); else ``<default_root_dir>/checkpoints``."""
    out = []
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.dirpath:
            out.append(str(cb.dirpath))
        elif trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            out.append(os.path.join(save_dir, str(logger.name), version, "checkpoints"))
        else:
            out.append(os.path.join(trainer.default_root_dir, "checkpoints"))
    return out


def refuse_fresh_run_over_checkpoints(dirs: list[str], ckpt_path: Optional[str]):
    """Raise when a run starts from scratch (no ``ckpt_path``) into a checkpoint directory that holds checkpoints.

    Starting over there would overwrite the earlier run's ``last.ckpt`` and mix both runs' TensorBoard events.
    """
    if ckpt_path is not None:
        return
    for d in dirs:
        found = sorted(e for e in os.listdir(d) if e.endswith(".ckpt")) if os.path.isdir(d) else []
        if found:
            raise FileExistsError(
                f"{d} already holds checkpoints of an earlier run ({', '.join(found[:4])}). Resume it with "
                "--ckpt_path last, start a new run under another name (--trainer.logger.init_args.name NAME, or "
                "--trainer.logger.init_args.version null for a fresh version_N), or delete that directory.")


class ConfigError(ValueError):
    """A config value the modules refused at start-up; the message names its YAML key (``src/train.py`` prints it
    without a traceback)."""


def config_errors(message: str) -> list[str]:
    """The project's own messages inside jsonargparse's "Does not validate against any of the Union subtypes" text
    (which also lists every subtype it tried and dumps the whole namespace)."""
    if "Errors:" not in message:
        return []
    errors = message.split("Errors:", 1)[1].split("\nGiven value", 1)[0]
    lines = [line.strip()[2:].strip() for line in errors.splitlines() if line.strip().startswith("- ")]
    return [line for line in lines if not line.startswith("Expected a <class")]


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

    def instantiate_classes(self):
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as e:
            errors = config_errors(str(e))
            if not errors and str(e).startswith(("data.", "model.", "trainer.")):
                errors = [str(e)]  # raised by a class that is not chosen by class_path (the DataModule)
            if not errors:
                raise
            raise ConfigError("\n".join(errors)) from None

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, with ``AtomicCheckpointIO`` added to its plugins unless the config chose a checkpoint IO, and
        a DeepSpeed strategy named by string made ``AtomicDeepSpeedStrategy``."""
        init = self._get(self.config_init, "trainer", default={})
        parsed = self._get(self.config, "trainer", default={})
        if "strategy" in init and "strategy" not in kwargs:
            kwargs["strategy"] = atomic_strategy(init["strategy"])
        if "plugins" not in kwargs and not names_checkpoint_io(init.get("plugins"), parsed.get("strategy")):
            kwargs["plugins"] = [*_as_list(init.get("plugins")), AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self):
        """Clean up after killed checkpoint writers, and refuse a fresh run over an earlier run's checkpoints."""
        dirs = checkpoint_dirs(self.trainer)
        for d in dirs:
            remove_stale_temps(d)
        refuse_fresh_run_over_checkpoints(dirs, self.config_init[self.subcommand].get("ckpt_path"))


def main(args=None):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return AlignCLI(model_class=None, datamodule_class=ShardDataModule, subclass_mode_model=True,
                    save_config_kwargs={"overwrite": True}, args=args)
