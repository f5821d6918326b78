"""Benchmark and monitoring callbacks: throughput, tokens/s, MFU, memory, skipped samples.

``Benchmark`` logs, every ``log_every`` optimizer steps, to TensorBoard (``perf/*``):

* ``samples_per_sec`` and ``tokens_per_sec`` (non-pad tokens of the training sequences, image tokens included);
* ``step_time`` (seconds per training batch, wall clock, synchronised on CUDA);
* ``tflops_per_sec`` and ``mfu``: model FLOPs from the token and image counts (below) over the measured time,
  divided by the device's peak for the training dtype (Lightning's table of GPU peaks; ``peak_tflops`` overrides
  it, e.g. for a CPU);
* ``max_memory_gib``: peak CUDA memory allocated (or the process's peak RSS on CPU).

FLOPs per batch, the usual dense-transformer estimate (Kaplan et al. 2020, arXiv 2001.08361; PaLM appendix B for
attention):

    forward = 2 * N_lm * T + 2 * layers * d * sum_i len_i^2 + 2 * N_vision * P
    training = forward * (2 + f)    f = 1 if the language model's weights train, else ~0 (LoRA)

with N_lm the language model's non-embedding parameters, T the tokens, P the image patches and d the hidden
size (the middle term: QK^T and AV over the causal half of each sequence); the backward pass costs one forward for activation gradients plus one for weight gradients when those are
trained. Modules whose step runs extra forwards (a DPO reference pass, PPO rollouts) report them through
``extra_forward_flops(batch)``.
"""

from __future__ import annotations

import resource
import time
from typing import Optional

import lightning as L
import torch

from .data.collate import batch_counts


def _numel(p) -> int:
    """A parameter's full size, also when it is a ZeRO-3 partition (whose local tensor is empty)."""
    return getattr(p, "ds_numel", None) or p.numel()


# Dense bf16 / fp16 peaks (TFLOP/s) of GPUs that Lightning's table does not know yet (vendor datasheets).
EXTRA_PEAK_TFLOPS = {"h200": 989.0}


def forward_flops(backbone, lengths: list[int], n_images: int) -> float:
    """Forward FLOPs of the language model over sequences of ``lengths`` plus ``n_images`` through the vision tower."""
    m = backbone.model
    tc, vc = m.config.text_config, m.config.vision_config
    n_lm = sum(_numel(p) for n, p in m.model.language_model.named_parameters() if "embed" not in n)
    n_lm += _numel(m.lm_head.weight)
    n_vis = sum(_numel(p) for p in m.model.vision_tower.parameters())
    patches = (vc.image_size // vc.patch_size) ** 2 + 1
    attn = 2 * tc.num_hidden_layers * tc.hidden_size * sum(l * l for l in lengths)  # QK^T and AV, causal half x 2
    return 2.0 * n_lm * sum(lengths) + attn + 2.0 * n_vis * patches * n_images


class Benchmark(L.Callback):
    """Throughput, MFU and memory, logged every ``log_every`` steps and summarised at the end of ``fit``.

    Args:
        log_every: optimizer steps between logs.
        warmup_steps: steps left out of the summary (compilation, allocator warm-up, DeepSpeed op builds).
        peak_tflops: peak dense TFLOP/s of one device for the training dtype; default: Lightning's table for
            known GPUs (e.g. H100 SXM bf16 989), none on CPU (then no MFU is logged).
    """

    def __init__(self, log_every: int = 10, warmup_steps: int = 3, peak_tflops: Optional[float] = None):
        self.log_every, self.warmup_steps, self.peak_tflops = log_every, warmup_steps, peak_tflops
        self._t0 = None
        self._window = {"time": 0.0, "samples": 0, "tokens": 0, "flops": 0.0, "steps": 0}
        self.summary_totals = {"time": 0.0, "samples": 0, "tokens": 0, "flops": 0.0, "steps": 0}

    def _peak(self, trainer) -> Optional[float]:
        if self.peak_tflops:
            return self.peak_tflops * 1e12
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return None
        from lightning.fabric.utilities.throughput import get_available_flops

        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else (
            torch.float16 if "16" in str(trainer.precision) else torch.float32)
        peak = get_available_flops(device, dtype)
        name = torch.cuda.get_device_name(device).lower()
        if peak is None and dtype != torch.float32:
            peak = next((t * 1e12 for key, t in EXTRA_PEAK_TFLOPS.items() if key in name), None)
        return peak

    def _sync(self, trainer):
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(trainer)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            return
        self._sync(trainer)
        dt = time.perf_counter() - self._t0
        samples, tokens, lengths = batch_counts(batch)
        pv = batch.get("pixel_values")
        n_images = int(pv.shape[0]) if isinstance(pv, torch.Tensor) and pv.dim() == 4 else 0
        bb = getattr(pl_module, "backbone", None)
        flops = 0.0
        if bb is not None and bb.built and lengths:
            fwd = forward_flops(bb, lengths, n_images)
            lm_trains = pl_module.backbone.config.train_language and pl_module.backbone.config.lora.r == 0
            flops = fwd * (2 + (1 if lm_trains else 0))
            extra = getattr(pl_module, "extra_forward_flops", None)
            if extra is not None:
                flops += extra(batch)
        w = self._window
        for k, v in (("time", dt), ("samples", samples), ("tokens", tokens), ("flops", flops), ("steps", 1)):
            w[k] += v
            if trainer.global_step > self.warmup_steps:
                self.summary_totals[k] += v
        if trainer.global_step % self.log_every == 0 and w["time"] > 0:
            metrics = {"perf/samples_per_sec": w["samples"] / w["time"], "perf/tokens_per_sec": w["tokens"] / w["time"],
                       "perf/step_time": w["time"] / w["steps"], "perf/tflops_per_sec": w["flops"] / w["time"] / 1e12,
                       "perf/max_memory_gib": self.memory_gib(trainer)}
            peak = self._peak(trainer)
            if peak:
                metrics["perf/mfu"] = w["flops"] / w["time"] / peak
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=max(1, samples))
            self._window = {k: 0 if k != "time" else 0.0 for k in w}

    @staticmethod
    def memory_gib(trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def summary(self, trainer) -> dict:
        t = self.summary_totals
        if not t["time"]:
            return {}
        out = {"steps": t["steps"], "samples_per_sec": t["samples"] / t["time"],
               "tokens_per_sec": t["tokens"] / t["time"], "step_time": t["time"] / t["steps"],
               "tflops_per_sec": t["flops"] / t["time"] / 1e12, "max_memory_gib": self.memory_gib(trainer)}
        peak = self._peak(trainer)
        if peak:
            out["mfu"] = t["flops"] / t["time"] / peak
        return out

    def on_fit_end(self, trainer, pl_module):
        s = self.summary(trainer)
        if s and trainer.is_global_zero:
            print("benchmark: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in s.items()))


def skipped_over_ranks(counts) -> dict[str, int]:
    """``{reason: count}`` summed over every rank (a collective under torch.distributed: every rank must call it;
    a plain copy in a single process)."""
    from .data.module import gather_per_rank

    total: dict[str, int] = {}
    for ranks_counts in gather_per_rank(dict(counts or {})).values():
        for reason, n in ranks_counts.items():
            total[reason] = total.get(reason, 0) + int(n)
    return dict(sorted(total.items()))


def skip_metrics(split: str, counts: dict[str, int]) -> dict[str, float]:
    """``{"<split>/skipped": total, "<split>/skipped/<reason>": count, ...}``, the names ``DataMonitor`` logs."""
    return {f"{split}/skipped": float(sum(counts.values())),
            **{f"{split}/skipped/{reason}": float(n) for reason, n in counts.items()}}


def _summary(counts: dict[str, int], what: str) -> str:
    """``"3 training samples (bad_image 1, bad_json 2)"``."""
    by_reason = " (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")" if counts else ""
    return f"{sum(counts.values())} {what}{by_reason}"


class DataMonitor(L.Callback):
    """Logs the samples the data stream skipped, per reason, and prints a summary at the end of ``fit``.

    Reads the ``ShardDataModule``'s exact counts (every bad sample is counted once, also after a reader's last
    batch and in a reader without batches; see ``data.pipeline``):

    * ``train/skipped`` (all reasons) and ``train/skipped/<reason>``: training samples skipped since the run began
      (``dm.skipped``, restored on resume, so the curve continues), after every training batch;
    * ``val/skipped`` and ``val/skipped/<reason>``: samples skipped by the latest validation pass
      (``dm.skipped_val``, of the batches it read: ``limit_val_batches`` stops it early), at the end of each
      validation pass (not the sanity check).

    Reasons are the stream's tags: ``bad_image``, ``image_too_large``, ``bad_json``, ``non_finite``, ``bad_record``,
    ``identical_pair``, ``too_long``, ``shard_truncated``, ``shard_corrupt``, ``shard_unreadable``, ... Under
    several processes the counts are summed over the ranks (a small ``all_gather_object`` per training batch and
    per validation pass; the ranks' reasons may differ, which ``sync_dist`` could not reduce). A reason appears once
    it has been met; the per-reason curves start there.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        skipped = getattr(trainer.datamodule, "skipped", None)
        if skipped is None:
            return
        pl_module.log_dict(skip_metrics("train", skipped_over_ranks(skipped)), on_step=True, on_epoch=False,
                           batch_size=1)

    def on_validation_epoch_end(self, trainer, pl_module):
        skipped = getattr(trainer.datamodule, "skipped_val", None)
        if skipped is None or trainer.sanity_checking:
            return
        pl_module.log_dict(skip_metrics("val", skipped_over_ranks(skipped)), on_step=False, on_epoch=True,
                           batch_size=1)

    def on_fit_end(self, trainer, pl_module):
        dm = trainer.datamodule
        if getattr(dm, "skipped", None) is None:
            return
        train = skipped_over_ranks(dm.skipped)
        val = skipped_over_ranks(getattr(dm, "skipped_val", None))
        if trainer.is_global_zero and (train or val):
            print(f"data: skipped {_summary(train, 'training samples')}; "
                  f"{_summary(val, 'in the latest validation pass')}")
