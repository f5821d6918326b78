"""Benchmark and monitoring callbacks: throughput, tokens/s, MFU, memory, skipped samples.

``Benchmark`` logs, every ``log_every`` optimizer steps, to TensorBoard (``perf/*``):

* ``samples_per_sec`` and ``tokens_per_sec`` (non-pad tokens of the training sequences, image tokens included);
* ``step_time``: wall-clock seconds per training batch, **from the end of the previous batch to the end of this
  one** (synchronised on CUDA), so the wait for the next batch (a data loader that cannot keep up, host-to-device
  copies, other callbacks' work between steps such as a checkpoint save) is part of it; timing it from the batch's
  start missed 3-5% on real runs. ``data_wait`` is the part of it spent before the batch started. The clock restarts
  after each validation pass, and the first batch of a fit is timed from its start;
* ``tflops_per_sec`` and ``mfu``: model FLOPs from the token and image counts (below) over the measured time,
  divided by the device's peak for the training dtype (Lightning's table of GPU peaks; ``peak_tflops`` overrides
  it, e.g. for a CPU);
* ``max_memory_gib``: peak CUDA memory allocated (or the process's peak RSS on CPU).

At the end of ``fit`` it prints ``benchmark: k=v, ...`` (numbers only: ``eval/gpu_check.py`` parses that line) and
writes the same summary, with what it was measured on, to ``benchmark.json`` in the run directory
(``trainer.log_dir``: the logger's version directory, else ``default_root_dir``).

FLOPs per batch, the usual dense-transformer estimate of *model* FLOPs (Kaplan et al. 2020, arXiv 2001.08361; PaLM
appendix B for attention); recomputation by gradient checkpointing is not counted, as MFU conventionally does not:

    forward(lengths, images) = 2 * N_lm * T + 2 * layers * d * sum_i len_i^2  +  2 * N_vision * P * images
    training = lm_forward * (2 + f)  +  vision_forward * (1 + 2 v)  +  extra_forward_flops(batch)

with N_lm the language model's non-embedding parameters (LoRA's and ``lm_head`` included), T the non-pad tokens,
len_i each row's length, d the hidden size (the middle term: QK^T and AV over the causal half of each row), N_vision
the CLIP tower's parameters and P its patches per image. The backward pass costs one forward for the activation
gradients plus, when the language model's own weights train (f = 1; f = 0 under LoRA), one for the weight gradients;
the vision tower runs backward only when it trains (v = 1, ``train_vision``). ``lm_head`` is counted on every token
although this project projects only the response / label positions onto the vocabulary (an overcount of
2 * vocab * d per unlabelled token, ~2% at LLaVA-1.5-7B scale).

What each algorithm's count covers:

======  ==============================================================  ===========================================
module  counted                                                         not counted
======  ==============================================================  ===========================================
SFT     the batch's sequences, forward + backward                       nothing
reward  the batch's rows (plain: k rows per example; packed: one),      the value head (hidden x 1 per row)
        forward + backward
DPO     the policy's rows, forward + backward; the reference pass       the reference pass under ``precomputed``
        (``extra_forward_flops``: one forward of the same rows, images  (none runs) and for reference-free losses
        again only when they are not shared) for ``adapter`` / ``copy``
KTO     the policy's rows (own + mismatched completion), forward +      the reference pass: ``KTOModule`` has no
        backward                                                        ``extra_forward_flops`` (it should reuse
                                                                        DPO's)
PPO     a forward + backward over the *prompt* batch only               rollout generation, the reward model, the
                                                                        reference and critic passes, the update
                                                                        epochs over the responses: ``PPOModule``
                                                                        has no ``extra_forward_flops``, so its
                                                                        TFLOP/s and MFU are far too low; read its
                                                                        samples/s and step time instead
======  ==============================================================  ===========================================
"""

from __future__ import annotations

import json
import os
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


def batch_images(batch: dict) -> int:
    """Images in a batch (rows of its 4D ``pixel_values``)."""
    pv = batch.get("pixel_values")
    return int(pv.shape[0]) if isinstance(pv, torch.Tensor) and pv.dim() == 4 else 0


def training_flops(module, batch: dict) -> float:
    """Model FLOPs of one training batch of an ``AlignModule`` (the module docstring's ``training``; 0 when its
    backbone is not built or the batch has no sequences)."""
    bb = getattr(module, "backbone", None)
    _, _, lengths = batch_counts(batch)
    if bb is None or not bb.built or not lengths:
        return 0.0
    cfg = bb.config
    lm_trains = cfg.train_language and cfg.lora.r == 0 and cfg.adapter is None
    flops = forward_flops(bb, lengths, 0) * (3 if lm_trains else 2)
    flops += forward_flops(bb, [], batch_images(batch)) * (3 if cfg.train_vision else 1)
    extra = getattr(module, "extra_forward_flops", None)
    return flops + (extra(batch) if extra is not None else 0.0)


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """Peak dense FLOP/s of one ``device`` for ``dtype``: Lightning's table, then ``EXTRA_PEAK_TFLOPS``; None on CPU
    or for an unknown GPU."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    peak = get_available_flops(device, dtype)
    name = torch.cuda.get_device_name(device).lower()
    if peak is None and dtype != torch.float32:
        peak = next((t * 1e12 for key, t in EXTRA_PEAK_TFLOPS.items() if key in name), None)
    return peak


def memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device`` since the last reset, or the process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Benchmark(L.Callback):
    """Throughput, MFU and memory, logged every ``log_every`` steps and summarised at the end of ``fit`` (printed and
    written to ``<run dir>/benchmark.json``). Step time includes the wait for data (see the module docstring).

    Args:
        log_every: optimizer steps between logs.
        warmup_steps: steps left out of the summary (compilation, allocator warm-up, DeepSpeed op builds).
        peak_tflops: peak dense TFLOP/s of one device for the training dtype; default: Lightning's table for
            known GPUs (e.g. H100 SXM bf16 989), none on CPU (then no MFU is logged).
    """

    KEYS = ("time", "wait", "samples", "tokens", "flops", "steps")

    def __init__(self, log_every: int = 10, warmup_steps: int = 3, peak_tflops: Optional[float] = None):
        self.log_every, self.warmup_steps, self.peak_tflops = log_every, warmup_steps, peak_tflops
        self._start = None  # this batch's start
        self._last_end = None  # the previous training batch's end (None: first batch, or after validation)
        self._window = dict.fromkeys(self.KEYS, 0)
        self.summary_totals = dict.fromkeys(self.KEYS, 0)

    def _dtype(self, trainer) -> torch.dtype:
        precision = str(trainer.precision)
        return torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32

    def _peak(self, trainer) -> Optional[float]:
        if self.peak_tflops:
            return self.peak_tflops * 1e12
        return device_peak_flops(trainer.strategy.root_device, self._dtype(trainer))

    def _now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = self._now(trainer)

    def on_validation_start(self, trainer, pl_module):
        self._last_end = None  # a validation pass is not a training step's time

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._last_end = self._now(trainer)  # the next batch's wait for data counts again

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is None:
            return
        end = self._now(trainer)
        began = self._last_end if self._last_end is not None else self._start
        dt, wait = end - began, self._start - began
        self._last_end = end
        samples, tokens, _ = batch_counts(batch)
        flops = training_flops(pl_module, batch)
        w = self._window
        for k, v in zip(self.KEYS, (dt, wait, samples, tokens, flops, 1)):
            w[k] += v
            if trainer.global_step > self.warmup_steps:
                self.summary_totals[k] += v
        if trainer.global_step % self.log_every == 0 and w["time"] > 0:
            metrics = {"perf/samples_per_sec": w["samples"] / w["time"], "perf/tokens_per_sec": w["tokens"] / w["time"],
                       "perf/step_time": w["time"] / w["steps"], "perf/data_wait": w["wait"] / w["time"],
                       "perf/tflops_per_sec": w["flops"] / w["time"] / 1e12,
                       "perf/max_memory_gib": memory_gib(trainer.strategy.root_device)}
            peak = self._peak(trainer)
            if peak:
                metrics["perf/mfu"] = w["flops"] / w["time"] / peak
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=max(1, samples))
            self._window = dict.fromkeys(self.KEYS, 0)

    @staticmethod
    def memory_gib(trainer) -> float:
        return memory_gib(trainer.strategy.root_device)

    def summary(self, trainer) -> dict:
        """The totals after warm-up as rates (numbers only); ``{}`` when no step was measured after warm-up."""
        t = self.summary_totals
        if not t["time"]:
            return {}
        out = {"steps": t["steps"], "samples_per_sec": t["samples"] / t["time"],
               "tokens_per_sec": t["tokens"] / t["time"], "step_time": t["time"] / t["steps"],
               "data_wait": t["wait"] / t["time"], "tflops_per_sec": t["flops"] / t["time"] / 1e12,
               "max_memory_gib": self.memory_gib(trainer)}
        peak = self._peak(trainer)
        if peak:
            out["mfu"] = t["flops"] / t["time"] / peak
        return out

    def on_fit_end(self, trainer, pl_module):
        s = self.summary(trainer)
        if not (s and trainer.is_global_zero):
            return
        print("benchmark: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
        run_dir = trainer.log_dir or trainer.default_root_dir
        device = trainer.strategy.root_device
        peak = self._peak(trainer)
        record = {**s, "rates_are": "global rank 0's (multiply by world_size for the whole run)",
                  "world_size": trainer.world_size, "precision": str(trainer.precision),
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "peak_tflops": peak / 1e12 if peak else None, "warmup_steps": self.warmup_steps,
                  "global_step": trainer.global_step, "algorithm": type(pl_module).__name__,
                  "step_time_includes": "the wait for data: previous batch end to this batch end",
                  "flops": "model FLOPs per vlalign.callbacks (no recomputation); see its docstring's table"}
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "benchmark.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)


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
