"""``AlignModule``: the one base LightningModule of every algorithm, and the contract an algorithm meets.

An algorithm is one subclass in its own file. It provides

    __init__(backbone, optim, <its settings>, export_dir)   calls super().__init__(backbone, optim, export_dir)
    batch_spec() -> dict                 which batches it trains on: {"format": "sft" | "pairs" | "prompts" |
                                         "unpaired", ...} (``data.module.ShardDataModule`` encodes them with the
                                         backbone's processor)
    step(batch) -> (loss, metrics)       the scalar loss of one batch and its metrics {name: scalar}, the same
                                         computation for training and validation

and, only when it needs them:

    build(deepspeed_config)              create its own parts after the backbone (a value head, a reference);
                                         ``deepspeed_config`` is set under ZeRO-3 (load/initialise gathered)
    trainable() -> (part, name, param)   the parameters to optimise: the backbone's, plus its own parts' (part
                                         ``head`` trains at ``optim.head_lr``)
    export(export_dir)                   what the end of fit writes; call ``super().export(export_dir)`` first
    extra_forward_flops(batch)           forwards beyond the policy's own (a reference pass), for ``Benchmark``
    training_step / validation_step      replace the default "one loss per batch" (PPO's rollouts), logging with
                                         ``self.log_metrics``

What the base owns, so an algorithm never repeats it:

* ``self.backbone``, the policy: the name the DataModule, the Benchmark callback and the export read. It is
  built in ``configure_model`` so DeepSpeed ZeRO-3 partitions it while it is created.
* The optimizer: one AdamW over ``trainable()`` with a group per part, from ``OptimConfig`` (``optim.py``).
* Checkpoints with the trainable weights only (everything frozen is rebuilt from the config), so loading is not
  strict; ``tokens_seen`` rides along.
* Export at the end of ``fit`` when ``export_dir`` is set: ``merged/`` (plain transformers) and ``adapter/``.
* Logging: ``log_metrics`` prefixes ``train/`` or ``val/``, weights by the batch's examples (a pair counts
  once), syncs across ranks in validation, and puts ``loss`` on the progress bar.

A minimal algorithm (SFT on the chosen answers of preference pairs, reading DPO's batches)::

    class ChosenSFT(AlignModule):
        def batch_spec(self):
            return {"format": "pairs", "layout": "packed", "num_responses": 2}

        def step(self, batch):
            logps = pair_logps(self.backbone, batch)          # PairLogps: sum, mean, tokens (batch, 2)
            loss = -logps.mean[:, 0].mean()
            return loss, {"chosen_logp": logps.sum[:, 0].mean()}
"""

from __future__ import annotations

from typing import Iterable, Optional

import lightning as L
from torch import Tensor, nn

from .backbone import Backbone, BackboneConfig
from .checkpoint import export_backbone, keep_trainable
from .data.collate import batch_counts
from .optim import OptimConfig, build_optimizer
from .zero import deepspeed_config_of


class AlignModule(L.LightningModule):
    """The base of every algorithm (the contract is the module docstring).

    Args:
        backbone: the policy LLaVA: its source (checkpoint, composition or the tiny default), what trains, LoRA.
        optim: optimizer and learning-rate schedule.
        export_dir: where the end of ``fit`` exports the trained model (``merged/``, and ``adapter/`` with LoRA);
            ``None``: no export.
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(),
                 export_dir: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters()  # every argument of the subclass's __init__, for hparams.yaml
        self.backbone = Backbone(backbone)
        self.optim, self.export_dir = optim, export_dir
        self.tokens_seen = 0
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self._configured = False

    # ------------------------------------------------------------------------------------- what an algorithm adds
    def batch_spec(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must say which batches it needs (batch_spec)")

    def step(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must compute its loss (step) or override training_step")

    def build(self, deepspeed_config: Optional[dict]):
        """Create the algorithm's own parts (heads, a reference) once the backbone exists. Default: nothing."""

    def trainable(self) -> Iterable[tuple[str, str, nn.Parameter]]:
        """(part, name, parameter) of everything the optimizer trains. Default: the backbone's trainable weights."""
        return self.backbone.named_trainable()

    def export(self, export_dir: str):
        """Write the trained model to ``export_dir`` (every rank calls it: ZeRO-3 gathers are collective)."""
        export_backbone(self, export_dir)

    def extra_forward_flops(self, batch: dict) -> float:
        """FLOPs of forwards beyond the policy's (a reference pass), for the Benchmark callback. Default: none."""
        return 0.0

    # ------------------------------------------------------------------------------------------ Lightning hooks
    @property
    def deepspeed_config(self) -> Optional[dict]:
        """The DeepSpeed config when training under ZeRO-3 (models must then load into partitions), else None."""
        return deepspeed_config_of(self._trainer)

    def configure_model(self):
        if self._configured:  # Lightning calls this hook again for validate/test after fit
            return
        self.backbone.build(self.deepspeed_config)
        self.build(self.deepspeed_config)
        self._configured = True

    def configure_optimizers(self):
        return build_optimizer(self, self.trainable(), self.optim)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, metrics = self.step(batch)
        self.log_metrics({"loss": loss, **metrics}, batch)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        loss, metrics = self.step(batch)
        self.log_metrics({"loss": loss, **metrics}, batch)

    def on_train_batch_start(self, batch: dict, batch_idx: int):
        self.tokens_seen += batch_counts(batch)[1]

    def log_metrics(self, metrics: dict[str, Tensor | float], batch: dict, prefix: Optional[str] = None,
                    batch_size: Optional[int] = None):
        """Log ``{name: scalar}`` as ``train/name`` while training and ``val/name`` otherwise (or ``prefix``).

        Weighted by the batch's examples (``batch_size`` overrides), so epoch values are per-example means;
        validation values are averaged across ranks. ``loss`` also goes to the progress bar.
        """
        training = self._trainer is None or self.trainer.training
        prefix = prefix or ("train" if training else "val")
        n = batch_size or max(1, batch_counts(batch)[0])
        for name, value in metrics.items():
            value = value.detach().float() if isinstance(value, Tensor) else float(value)
            self.log(f"{prefix}/{name}", value, batch_size=n, prog_bar=name == "loss", sync_dist=not training)
        if training:
            self.log("train/tokens_seen", float(self.tokens_seen), batch_size=n)

    def on_save_checkpoint(self, checkpoint: dict):
        keep_trainable(self, checkpoint)
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)

    def on_fit_end(self):
        if self.export_dir:
            self.export(self.export_dir)

