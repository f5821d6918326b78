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
  strict; ``tokens_seen`` and ``skipped_steps`` ride along. A checkpoint of non-finite trainable weights is refused.
* Start-up validation: every config value that cannot be right (a beta <= 0, a negative learning rate, an unknown
  name, a missing directory, a checkpoint that is not a LLaVA) raises in ``__init__``, i.e. when LightningCLI
  instantiates the module and before ``configure_model`` builds anything, with the key as written in the YAML
  (``model.init_args.beta must be > 0, got 0``). An algorithm checks its own arguments with ``require`` before
  calling ``super().__init__``.
* The non-finite guard (``optim.nonfinite``): after backward and before each optimizer step, the step's loss(es) and
  the trainable gradients are checked for NaN / inf, with one fused reduction and one host sync, agreed across
  ranks. ``skip`` drops the gradients (AdamW then leaves every weight and moment untouched), counts the step in
  ``self.skipped_steps`` (logged as ``train/skipped_steps``, saved in checkpoints) and warns with the batch's sample
  ids; ``raise`` stops the run naming the step, the sample ids and the loss or the parameters that were non-finite.
  Automatic optimisation runs it from ``on_before_optimizer_step`` (after AMP's unscaling, before clipping); an
  algorithm that steps its optimizer itself (PPO) calls ``guard_step`` before each ``optimizer.step()``.
  Under DeepSpeed, ZeRO keeps the gradients in its own partitioned buffers (``p.grad`` is empty there): the guard
  checks the loss only, and a non-finite gradient is left to ZeRO's own overflow check, which skips that step
  (fp16; bf16 with ``check_grad_overflow``, its default; fp32 only with gradient clipping set), uncounted here.
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

import logging
from typing import Any, Iterable, Optional

import lightning as L
import torch
from torch import Tensor, nn

from .backbone import Backbone, BackboneConfig, LoraSpec, TinySpec
from .checkpoint import export_backbone, keep_trainable
from .data.collate import batch_counts
from .optim import OptimConfig, build_optimizer, nonfinite_flags
from .zero import deepspeed_config_of

log = logging.getLogger(__name__)

# Checkpoints keep the modules' hyper-parameters, which hold these config dataclasses: let torch's safe loader
# (``weights_only=True``, its default) rebuild them, so ``Trainer.fit(ckpt_path=...)`` resumes without unpickling code.
torch.serialization.add_safe_globals([BackboneConfig, LoraSpec, TinySpec, OptimConfig])

CONFIG_KEY = "model.init_args"
"""Where a module's arguments sit in the CLI's YAML (``model: {class_path, init_args}``): error messages name a wrong
value by its full dotted key, as the user wrote it (``model.init_args.optim.lr``)."""


def require(ok: bool, key: str, rule: str, value: Any):
    """Raise ``ValueError("model.init_args.<key> must be <rule>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{CONFIG_KEY}.{key} must be {rule}, got {value!r}")


def is_number(x: Any) -> bool:
    """An int or float that is not a bool (NaN then fails every range test written as ``lo < x``)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
        optim.validate(f"{CONFIG_KEY}.optim")
        backbone.validate(f"{CONFIG_KEY}.backbone")  # before the processor loads anything
        super().__init__()
        self.save_hyperparameters()  # every argument of the subclass's __init__, for hparams.yaml
        self.backbone = Backbone(backbone)
        self.optim, self.export_dir = optim, export_dir
        self.tokens_seen = 0
        self.skipped_steps = 0  # optimizer steps dropped by the non-finite guard
        self._step_losses: list[Tensor] = []  # the micro-batches' losses since the last optimizer step
        self._step_ids: list = []  # and their sample ids
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
        self._step_losses.append(loss.detach())
        self.log_metrics({"loss": loss, **metrics}, batch)
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        loss, metrics = self.step(batch)
        self.log_metrics({"loss": loss, **metrics}, batch)

    def on_train_batch_start(self, batch: dict, batch_idx: int):
        self.tokens_seen += batch_counts(batch)[1]
        if self.automatic_optimization:
            self._step_ids.extend(batch.get("ids", ()))

    def on_before_optimizer_step(self, optimizer):
        """The non-finite guard of automatic optimisation (manual optimisation calls ``guard_step`` itself)."""
        if not self.automatic_optimization:
            return
        losses, ids = self._step_losses, self._step_ids
        self._step_losses, self._step_ids = [], []
        self.guard_step(losses, ids, optimizer)

    def guard_step(self, losses: list[Tensor], ids: list, optimizer=None) -> bool:
        """Check the coming optimizer step for non-finite values; True when it may run (see the module docstring).

        losses: the scalar losses whose gradients the step applies (every micro-batch under gradient accumulation);
        ids: their batches' sample ids, for the message; optimizer: whose parameters' gradients are checked and, on
        ``skip``, dropped (default: ``self.optimizers()``). With ``skip`` a False return means the gradients are gone
        (``p.grad = None``): stepping anyway changes nothing, and skipping the call is as good.
        """
        optimizer = optimizer if optimizer is not None else self.optimizers()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        loss_values = torch.stack([loss.detach().float().reshape(()) for loss in losses]) if losses else None
        grads_bad = nonfinite_flags([p.grad for p in params])
        flags = grads_bad if loss_values is None else torch.cat([grads_bad.to(loss_values.device),
                                                               ~loss_values.isfinite()])
        local_ok = not bool(flags.any())  # the one host sync of a step
        ok = local_ok
        if self._trainer is not None and self.trainer.world_size > 1:
            ok = self.trainer.strategy.reduce_boolean_decision(local_ok, all=True)
        if not ok:
            self._skip_or_raise(loss_values, grads_bad, params, local_ok, ids)
        if self._trainer is not None:
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        return ok

    def _skip_or_raise(self, loss_values: Optional[Tensor], grads_bad: Tensor, params: list, local_ok: bool,
                       ids: list):
        what = self._nonfinite_report(loss_values, grads_bad, params, local_ok)
        where = f"global step {self.global_step}" + (f" (rank {self.global_rank})" if self._trainer is not None
                                              and self.trainer.world_size > 1 else "")
        if self.optim.nonfinite == "raise":
            raise RuntimeError(f"non-finite {what} at {where}; batch sample ids: {list(ids)}. "
                               f"(model.init_args.optim.nonfinite: raise; 'skip' drops such steps and trains on)")
        for p in params:
            p.grad = None
        self.skipped_steps += 1
        log.warning("skipped optimizer %s: non-finite %s; batch sample ids: %s (%d step(s) skipped so far)",
                    where, what, list(ids), self.skipped_steps)

    def _nonfinite_report(self, loss_values: Optional[Tensor], grads_bad: Tensor, params: list, local_ok: bool) -> str:
        """What was non-finite, in words: the loss, and which gradients (by parameter name)."""
        if local_ok:
            return "values on another rank (this rank's loss and gradients are finite)"
        parts = []
        if loss_values is not None and not bool(loss_values.isfinite().all()):
            parts.append(f"loss ({', '.join(f'{v:g}' for v in loss_values.tolist())})")
        bad = grads_bad.nonzero().flatten().tolist()
        if bad:
            names = {id(p): n for n, p in self.named_parameters()}
            shown = [names.get(id(params[i]), f"param {i}") for i in bad[:3]]
            parts.append(f"gradients of {len(bad)}/{len(params)} parameters ({', '.join(shown)}"
                         + (", ..." if len(bad) > 3 else "") + ")")
        return " and ".join(parts)

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
        self._refuse_nonfinite_weights()
        keep_trainable(self, checkpoint)
        checkpoint["tokens_seen"] = self.tokens_seen
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict):
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
        self.skipped_steps = checkpoint.get("skipped_steps", 0)

    def _refuse_nonfinite_weights(self):
        """Raise when a trainable weight holds NaN / inf, so that no checkpoint of a diverged run is written.

        Every rank checks its own copy (its ZeRO-3 partition, ``ds_tensor``) and the ranks agree, so all of them raise.
        """
        if not self._configured:
            return
        named = [(f"{part}.{n}", getattr(p, "ds_tensor", p).detach()) for part, n, p in self.trainable()]
        flags = nonfinite_flags([t for _, t in named])
        local_ok = not bool(flags.any())
        ok = local_ok
        if self._trainer is not None and self.trainer.world_size > 1:
            ok = self.trainer.strategy.reduce_boolean_decision(local_ok, all=True)
        if not ok:
            bad = [named[i][0] for i in flags.nonzero().flatten().tolist()]
            raise RuntimeError(f"refusing to checkpoint at step {self.global_step}: trainable weights hold NaN or inf "
                               f"({', '.join(bad[:5]) or 'on another rank'}{', ...' if len(bad) > 5 else ''}); the "
                               "last checkpoint written is kept. Lower the learning rate or keep "
                               "model.init_args.optim.nonfinite: skip")

    def on_fit_end(self):
        if self.export_dir:
            self.export(self.export_dir)

