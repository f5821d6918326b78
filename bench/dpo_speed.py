"""How fast the project's DPO step trains, beside TRL's DPOTrainer on the same model, pairs and card.

    python bench/dpo_speed.py --size 7b --batch 4,8,16                    # one GPU, LLaVA-1.5-7B shape, bf16
    python bench/dpo_speed.py --size tiny --batch 8 --json runs/bench.json  # CPU, float32, about a minute
    python bench/dpo_speed.py --size 7b --batch 4 --variants packed --checkpointing off --trl off

It builds a model with random weights and saves it once (``--size 7b``: a LLaVA-1.5-7B-shaped LLaVA, CLIP ViT-L/14
at 336 px = 576 image tokens + a Llama-7B decoder, vocabulary 32064, bf16, on the GPU; ``--size tiny``: the
project's embedded tiny LLaVA exported, float32, on the CPU), puts LoRA on every language-model linear (r 128,
alpha 256; tiny r 16, alpha 32; dropout 0), writes synthetic image preference pairs (~40-token questions,
150-250-token answers; tiny shorter), and times one training step per row:

* the project's rows run the real ``DPOModule.step`` (sigmoid DPO, beta 0.1) + ``backward`` + AdamW step on the
  real collated batches (``data.pipeline.Encode`` + ``data.collate.collate_pairs``), reference = the disabled
  adapter, in three variants: ``plain`` (each [prompt | response] its own row), ``packed`` (one row [prompt |
  chosen | rejected] per pair, the shared prefix once) and ``precomputed`` (packed, with the reference log-probs
  given in the batch: no reference pass);
* the ``trl`` row, when ``trl`` is importable (an optional extra, never a dependency of the project), runs TRL's
  ``DPOTrainer`` (its vision collator, its forward) on the same saved weights and the same pairs, as a
  ``datasets.Dataset`` in TRL's standard vision layout (``images``, conversational ``prompt`` / ``chosen`` /
  ``rejected``), LoRA through peft with the same config, the same batch size, gradient checkpointing as in the
  row, ``precompute_ref_log_probs=False``. TRL 1.16 tokenises the prompt without BOS and appends no EOS to the
  answers of image datasets (one or two tokens fewer per row than the project's), which changes nothing measurable.

Every row is one (variant, batch size, gradient checkpointing); with several batch sizes a variant stops at its
first out-of-memory (printed ``OOM``), so a sweep finds the largest batch that fits. Columns:

* ``pairs/s`` = batch / step time; ``img tok/s`` and ``text tok/s``: the pairs' image tokens (images x image tokens)
  and text tokens (prompt text + chosen + rejected, the project's encoding) per second; the same data in every row,
  so the rates compare rows directly (whatever a variant recomputes);
* ``step s``: the median over the timed steps after warm-up, wall clock, synchronised on CUDA: host-to-device copy,
  forward(s), backward and the optimizer step. TRL's is timed by a ``TrainerCallback`` from ``on_step_begin`` to
  ``on_step_end`` (its batch is fetched and collated before, as the project's is by its DataLoader);
* ``peak GiB``: CUDA max allocated during the row (weights included; the previous row's model is freed first), on
  the CPU the process's peak RSS so far (monotone over the rows: a ceiling, not the row's own);
* ``MFU``: model FLOPs per step / step time / device peak, the FLOPs of ``vlalign.callbacks.training_flops`` (its
  docstring derives them; recomputation by checkpointing not counted) for the rows' own sequences: packed rows count
  the prefix once, the TRL row its two rows per pair with each image encoded per row and per model, plain-layout
  lengths. The peak: Lightning's GPU table (H200 bf16 989 TFLOP/s), or ``--peak-tflops``; empty on a CPU without it;
* ``x TRL``: pairs/s over the TRL row's at the same batch and checkpointing.

``--json OUT`` writes the rows (and the setup) as JSON. ``tests/test_bench.py`` runs ``--size tiny`` in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

VARIANTS = {"plain": ("plain", "adapter"), "packed": ("packed", "adapter"), "precomputed": ("packed", "precomputed")}


@dataclass
class Size:
    """One benchmark size: where and in what dtype it runs, its LoRA, and the synthetic pairs' token lengths."""

    device: str
    dtype: str
    lora_r: int
    lora_alpha: float
    prompt_tokens: tuple[int, int]
    answer_tokens: tuple[int, int]
    pairs: int


SIZES = {"7b": Size("cuda", "bfloat16", 128, 256.0, (35, 45), (150, 250), 64),
         "tiny": Size("cpu", "float32", 16, 32.0, (8, 12), (20, 40), 32)}


# ------------------------------------------------------------------------------------------------ the model
def big_shapes(cpu: bool) -> dict:
    """LLaVA-1.5-7B's shapes (or, with ``cpu``, a small stand-in with the same structure and vocabulary)."""
    if cpu:
        return dict(image=56, patch=14, v_hidden=64, v_layers=2, v_heads=4, v_inter=256, hidden=128, layers=2,
                    heads=4, inter=344, vocab=32064)
    return dict(image=336, patch=14, v_hidden=1024, v_layers=24, v_heads=16, v_inter=4096, hidden=4096, layers=32,
                heads=32, inter=11008, vocab=32064)


def make_big_checkpoint(path: str, cpu: bool) -> dict:
    """A random-weight LLaVA of ``big_shapes`` saved as bf16 safetensors with the embedded tokenizer's processor."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vlalign.backbone import Backbone, BackboneConfig, TinySpec

    s = big_shapes(cpu)
    bb = Backbone(BackboneConfig(tiny=TinySpec(image_size=s["image"], patch_size=s["patch"])))  # processor only
    tok = bb.tokenizer
    vision = CLIPVisionConfig(hidden_size=s["v_hidden"], intermediate_size=s["v_inter"], num_hidden_layers=s["v_layers"],
                              num_attention_heads=s["v_heads"], image_size=s["image"], patch_size=s["patch"],
                              projection_dim=768)
    text = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["heads"], intermediate_size=s["inter"],
                       max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=bb.image_token_id,
                         image_seq_length=(s["image"] // s["patch"]) ** 2)
    device = "cpu" if cpu else "cuda"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="5GB")
    bb.processor.save_pretrained(path)
    del model
    info = {"params_b": n / 1e9, "bytes_gib": n * 2 / 2**30, "make_seconds": time.perf_counter() - t0}
    print(f"big checkpoint: {info}", flush=True)
    return info


def make_tiny_checkpoint(path: str) -> dict:
    """The project's embedded tiny LLaVA (random init, its own BPE tokenizer) exported as a plain checkpoint."""
    from vlalign.backbone import Backbone, BackboneConfig

    bb = Backbone(BackboneConfig()).build()
    bb.export_merged(path)
    n = sum(p.numel() for p in bb.model.parameters())
    return {"params_b": n / 1e9}


# ------------------------------------------------------------------------------------------------ the pairs
WORDS = ("the a red blue green yellow circle square triangle star small large object is on left right of above "
         "below near far next to image shows there one two three and with behind in front").split()


def long_pair_records(n: int, image: int, tokenizer, seed: int = 0, prompt_tokens=(35, 45),
                      answer_tokens=(150, 250)) -> list:
    """``n`` synthetic (PreferenceRecord, [PIL image]) pairs shaped like LLaVA instruction data: a question of
    ``prompt_tokens`` tokens after ``<image>``, answers of ``answer_tokens`` tokens, random-noise images."""
    import numpy as np
    from PIL import Image

    from vlalign.data.schema import PreferenceRecord

    rng = random.Random(seed)

    def text(lo, hi):
        target = rng.randint(lo, hi)
        words = []
        while len(tokenizer(" ".join(words))["input_ids"]) < target:
            words.extend(rng.choice(WORDS) for _ in range(8))
        return " ".join(words)

    out = []
    for i in range(n):
        px = np.random.default_rng(seed * 100003 + i).integers(0, 255, (image, image, 3), dtype=np.uint8)
        question = text(*prompt_tokens)
        chosen, rejected = text(*answer_tokens), text(*answer_tokens)
        out.append((PreferenceRecord(f"long{i}", [{"role": "user", "content": "<image>\n" + question}], chosen,
                                     rejected), [Image.fromarray(px)]))
    return out


def write_long_pairs(pattern: str, n: int, image: int, tokenizer, seed: int = 0) -> dict:
    """``long_pair_records`` written as shards (``pattern`` like ``dir/train-%06d.tar``)."""
    from vlalign.data.shards import ShardWriter

    records = long_pair_records(n, image, tokenizer, seed)
    with ShardWriter(pattern, max_count=n) as w:
        for record, images in records:
            w.write(record, images)
    lengths = [len(tokenizer(r.chosen)["input_ids"]) for r, _ in records]
    return {"pairs": n, "mean_answer_tokens": sum(lengths) / len(lengths)}


# ----------------------------------------------------------------------------------------- the project's step
def backbone_config(ckpt: str, size: Size, checkpointing: bool):
    from vlalign.backbone import BackboneConfig, LoraSpec

    return BackboneConfig(checkpoint=ckpt, lora=LoraSpec(r=size.lora_r, alpha=size.lora_alpha, dropout=0.0),
                          train_projector=False, gradient_checkpointing=checkpointing, dtype=size.dtype)


def encode_pairs(backbone, records: list, max_length: int) -> list:
    """The records as the project's ``PairExample``s (the data pipeline's own encode stage)."""
    from vlalign.data.chat import Encoder
    from vlalign.data.pipeline import Encode

    encoder = Encoder(backbone.tokenizer, backbone.processor.chat_template, backbone.num_image_tokens)
    encode = Encode(encoder, backbone.processor.image_processor, "pairs", max_length)
    return [encode(record, images) for record, images in records]


def pair_token_counts(backbone, examples: list) -> tuple[float, float]:
    """(image tokens, text tokens) per pair, averaged: image tokens = images x image tokens; text = the prompt's other
    tokens + both responses."""
    image = text = 0
    for e in examples:
        n_img = sum(1 for t in e.prompt if t == backbone.image_token_id)
        image += n_img
        text += len(e.prompt) - n_img + sum(len(r) for r in e.responses)
    return image / len(examples), text / len(examples)


def batches(examples: list, batch: int, pad_id: int, layout: str, count: int) -> list[dict]:
    """``count`` collated batches of ``batch`` consecutive examples each, cycling through ``examples``."""
    from vlalign.data.collate import collate_pairs

    out = []
    for b in range(count):
        chunk = [examples[(b * batch + i) % len(examples)] for i in range(batch)]
        out.append(collate_pairs(chunk, pad_id, layout=layout))
    return out


@torch.no_grad()
def with_reference_logps(backbone, examples: list, device) -> list:
    """The examples with their reference log-probs (the disabled adapter's), as ``data_prep/precompute_ref.py``
    stores them in shards."""
    from dataclasses import replace

    from vlalign.data.collate import collate_pairs, to_device
    from vlalign.logps import pair_logps

    out = []
    for i in range(0, len(examples), 8):
        chunk = examples[i:i + 8]
        batch = to_device(collate_pairs(chunk, backbone.tokenizer.pad_token_id, layout="packed"), device)
        with backbone.adapter_disabled():
            lp = pair_logps(backbone, batch)
        for j, e in enumerate(chunk):
            refs = [{"sum": float(lp.sum[j, r]), "mean": float(lp.mean[j, r]), "tokens": int(lp.tokens[j, r])}
                    for r in range(lp.sum.shape[1])]
            out.append(replace(e, ref_logps=refs))
    return out


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def trl_step_flops(backbone, examples: list, batch: int) -> float:
    """Model FLOPs of TRL's step on ``batch`` pairs: the policy's forward + backward and the reference's forward over
    two [prompt | response] rows per pair, each image encoded in every row by both models (the lengths of the
    project's plain layout of the same pairs: TRL's rows are one or two tokens shorter)."""
    from vlalign.callbacks import forward_flops
    from vlalign.data.collate import batch_counts

    lengths = batch_counts(batches(examples, batch, backbone.tokenizer.pad_token_id, "plain", 1)[0])[2]
    lm, vision = forward_flops(backbone, lengths, 0), forward_flops(backbone, [], 2 * batch)
    return (2 * lm + vision) + (lm + vision)  # policy (LoRA: activation gradients, no weight gradients) + reference


def time_project(module, data: list[dict], warmup: int, steps: int, device: torch.device) -> dict:
    """Step times (s) of ``DPOModule.step`` + backward + AdamW over ``data`` (cycled), and the peak memory."""
    from vlalign.callbacks import memory_gib, training_flops
    from vlalign.data.collate import to_device

    params = [p for _, _, p in module.trainable()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times, flops = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for i in range(warmup + steps):
            cpu_batch = data[i % len(data)]
            synchronize(device)
            t0 = time.perf_counter()
            batch = to_device(cpu_batch, device)
            loss, _ = module.step(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                flops.append(training_flops(module, batch))
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite DPO loss {float(loss)} at step {i}")
    finally:
        opt.zero_grad(set_to_none=True)
        del opt
    return {"step_s": statistics.median(times), "flops": statistics.mean(flops), "peak_gib": memory_gib(device)}


def project_rows(ckpt: str, size: Size, records: list, batch_sizes: list[int], variants: list[str],
                 checkpointing: bool, warmup: int, steps: int, device: torch.device) -> tuple[list[dict], dict]:
    """The project's rows for one gradient-checkpointing setting: one backbone built, shared by the variants (each a
    real ``DPOModule`` around it), freed at the end. Also returns the pairs' token counts and TRL's FLOPs per batch
    size (``trl_step_flops``), computed while the model is at hand."""
    from vlalign.backbone import Backbone
    from vlalign.dpo import DPOModule
    from vlalign.optim import OptimConfig

    cfg = backbone_config(ckpt, size, checkpointing)
    backbone = Backbone(cfg).build().to(device)
    pad = backbone.tokenizer.pad_token_id
    examples = encode_pairs(backbone, records, max_length=4096)
    examples_ref = with_reference_logps(backbone, examples, device) if "precomputed" in variants else examples
    image_tokens, text_tokens = pair_token_counts(backbone, examples)
    rows = []
    counts = {"image_tokens_per_pair": image_tokens, "text_tokens_per_pair": text_tokens,
              "trl_flops": {b: trl_step_flops(backbone, examples, b) for b in batch_sizes}}
    try:
        for variant in variants:
            layout, reference = VARIANTS[variant]
            module = DPOModule(backbone=cfg, optim=OptimConfig(lr=1e-5, warmup_steps=0), layout=layout,
                               reference=reference)
            module.backbone = backbone  # the one built model; the module is otherwise the real DPOModule
            module.configure_model()
            module.to(device).train()
            source = examples_ref if reference == "precomputed" else examples
            for b in batch_sizes:
                row = {"impl": "vlalign", "variant": variant, "batch": b, "checkpointing": checkpointing,
                       "image_tokens_per_pair": image_tokens, "text_tokens_per_pair": text_tokens}
                data = batches(source, b, pad, layout, min(warmup + steps, max(1, len(source) // b)))
                try:
                    row.update(time_project(module, data, warmup, steps, device))
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not is_oom(e):
                        raise
                    row["status"] = "OOM"
                free_memory(device)
                rows.append(row)
                print_row(row, flush=True)
                if row.get("status") == "OOM":
                    break  # larger batches of this variant will not fit either
            del module
    finally:
        del backbone
        free_memory(device)
    return rows, counts


# ------------------------------------------------------------------------------------------------ TRL's step
def trl_missing() -> Optional[str]:
    """Why the TRL row cannot run here (None when it can)."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        return f"trl / datasets not importable ({e.name}); pip install trl datasets for the TRL row"
    from trl import DPOConfig

    needed = ("precompute_ref_log_probs", "gradient_checkpointing", "per_device_train_batch_size", "max_length",
              "beta", "max_steps", "report_to", "bf16")
    fields = getattr(DPOConfig, "__dataclass_fields__", {})
    missing = [f for f in needed if f not in fields]
    if missing:
        return f"trl {trl.__version__}'s DPOConfig lacks {missing}"
    return None


def trl_dataset(records: list):
    """The pairs in TRL's standard vision layout: ``images`` and conversational ``prompt`` / ``chosen`` /
    ``rejected`` (the ``<image>`` placeholder is TRL's to insert)."""
    from datasets import Dataset

    rows = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for record, images in records:
        question = record.prompt[-1]["content"].replace("<image>\n", "").replace("<image>", "")
        rows["images"].append(images)
        rows["prompt"].append([{"role": "user", "content": question}])
        rows["chosen"].append([{"role": "assistant", "content": record.chosen}])
        rows["rejected"].append([{"role": "assistant", "content": record.rejected}])
    return Dataset.from_dict(rows)


def trl_row(ckpt: str, size: Size, records: list, batch: int, checkpointing: bool, warmup: int, steps: int,
            device: torch.device, out_dir: str) -> dict:
    """TRL's ``DPOTrainer`` on the same checkpoint and pairs: step times from a callback, peak memory."""
    import trl
    from peft import LoraConfig
    from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from vlalign.backbone import LANGUAGE_LINEARS, LoraSpec
    from vlalign.callbacks import memory_gib

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t0 = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize(device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.times.append(time.perf_counter() - self._t0)

    dtype = torch.bfloat16 if size.dtype == "bfloat16" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device)
    processor = AutoProcessor.from_pretrained(ckpt)
    lora = LoraConfig(r=size.lora_r, lora_alpha=size.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=LoraSpec(targets=list(LANGUAGE_LINEARS)).target_regex())
    wanted = dict(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=warmup + steps,
                  learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, beta=0.1,
                  gradient_checkpointing=checkpointing, precompute_ref_log_probs=False, max_length=None,
                  bf16=dtype == torch.bfloat16, report_to="none", save_strategy="no", logging_steps=10**6,
                  dataloader_num_workers=0, use_cpu=device.type == "cpu", seed=0, disable_tqdm=True)
    fields = DPOConfig.__dataclass_fields__
    args = DPOConfig(**{k: v for k, v in wanted.items() if k in fields})
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=trl_dataset(records), processing_class=processor,
                         peft_config=lora, callbacks=[timer])
    try:
        trainer.train()
        times = timer.times[warmup:]
        return {"impl": f"trl {trl.__version__}", "step_s": statistics.median(times), "peak_gib": memory_gib(device)}
    finally:
        del trainer, model
        free_memory(device)


# ------------------------------------------------------------------------------------------------------ table
COLUMNS = ("impl", "variant", "batch", "ckpt", "pairs/s", "img tok/s", "text tok/s", "step s", "peak GiB", "MFU",
           "x TRL")


def finish(rows: list[dict], peak_flops: Optional[float]):
    """Rates, MFU and the ratio to the TRL row of the same batch and checkpointing, in place."""
    for r in rows:
        if "step_s" not in r:
            continue
        r["pairs_per_s"] = r["batch"] / r["step_s"]
        r["image_tokens_per_s"] = r["pairs_per_s"] * r["image_tokens_per_pair"]
        r["text_tokens_per_s"] = r["pairs_per_s"] * r["text_tokens_per_pair"]
        r["tflops_per_s"] = r["flops"] / r["step_s"] / 1e12
        r["mfu"] = r["flops"] / r["step_s"] / peak_flops if peak_flops else None
    trl = {(r["batch"], r["checkpointing"]): r["pairs_per_s"] for r in rows
           if r["impl"] != "vlalign" and "pairs_per_s" in r}
    for r in rows:
        ref = trl.get((r["batch"], r["checkpointing"]))
        r["x_trl"] = r["pairs_per_s"] / ref if ref and "pairs_per_s" in r else None


def cells(r: dict) -> list[str]:
    head = [r["impl"], r.get("variant", ""), str(r["batch"]), "on" if r["checkpointing"] else "off"]
    if "step_s" not in r:
        return head + [r.get("status", "?")] + [""] * (len(COLUMNS) - 5)
    f = lambda v, d: "" if v is None else f"{v:.{d}f}"  # noqa: E731
    return head + [f(r.get("pairs_per_s"), 2), f(r.get("image_tokens_per_s"), 0), f(r.get("text_tokens_per_s"), 0),
                   f(r["step_s"], 3), f(r["peak_gib"], 2), f(r.get("mfu"), 3), f(r.get("x_trl"), 2)]


def print_row(r: dict, flush: bool = False):
    """A progress line as a row finishes (the table is printed at the end)."""
    state = r.get("status") or f"{r['step_s']:.3f} s/step, {r['peak_gib']:.2f} GiB"
    print(f"  {r['impl']} {r.get('variant', '')} batch {r['batch']} checkpointing "
          f"{'on' if r['checkpointing'] else 'off'}: {state}", flush=flush)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="7b: LLaVA-1.5-7B shape on a GPU; tiny: CPU")
    p.add_argument("--batch", default="8", help="comma-separated batch sizes in pairs (ascending: a sweep)")
    p.add_argument("--variants", default="plain,packed,precomputed", help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing: off, on, or off,on")
    p.add_argument("--trl", choices=("auto", "off"), default="auto", help="auto: the TRL row when trl is importable")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (the median is reported)")
    p.add_argument("--pairs", type=int, default=None, help="synthetic pairs (default: 64 for 7b, 32 for tiny)")
    p.add_argument("--checkpoint", default=None, help="an existing checkpoint dir to use instead of building one")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: Lightning's GPU "
                   "table; none on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the rows here as JSON")
    args = p.parse_args(argv)
    args.batch = [int(b) for b in args.batch.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    args.checkpointing = [{"off": False, "on": True}[c] for c in args.checkpointing.split(",")]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    size = SIZES[args.size]
    if args.threads:
        torch.set_num_threads(args.threads)
    if size.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--size 7b needs a CUDA GPU (use --size tiny on a CPU)")
    device = torch.device(size.device)
    from vlalign.callbacks import device_peak_flops

    dtype = torch.bfloat16 if size.dtype == "bfloat16" else torch.float32
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops(device, dtype)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(tempfile.TemporaryDirectory(prefix="dpo_speed_"))
        ckpt = args.checkpoint
        info = {}
        if ckpt is None:
            ckpt = os.path.join(work, "model")
            info = make_big_checkpoint(ckpt, cpu=False) if args.size == "7b" else make_tiny_checkpoint(ckpt)
        from vlalign.backbone import Backbone, BackboneConfig

        probe = Backbone(BackboneConfig(checkpoint=ckpt))  # tokenizer and processor only
        ip = probe.processor.image_processor
        image = ip.crop_size["height"] if getattr(ip, "crop_size", None) else ip.size["shortest_edge"]
        records = long_pair_records(args.pairs or size.pairs, image, probe.tokenizer, 0, size.prompt_tokens,
                                    size.answer_tokens)
        print(f"dpo_speed: size {args.size}, {device}, {size.dtype}, LoRA r{size.lora_r}/alpha{size.lora_alpha:g}, "
              f"{len(records)} pairs, batches {args.batch}, setup {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        reason = trl_missing() if args.trl == "auto" else "--trl off"
        for checkpointing in args.checkpointing:
            ours, counts = project_rows(ckpt, size, records, args.batch, args.variants, checkpointing, args.warmup,
                                        args.steps, device)
            rows += ours
            if reason is not None:
                continue
            for b in args.batch:
                row = {"impl": "trl", "variant": "", "batch": b, "checkpointing": checkpointing,
                       "image_tokens_per_pair": counts["image_tokens_per_pair"],
                       "text_tokens_per_pair": counts["text_tokens_per_pair"]}
                try:
                    row.update(trl_row(ckpt, size, records, b, checkpointing, args.warmup, args.steps, device,
                                       os.path.join(work, "trl")))
                    row["flops"] = counts["trl_flops"][b]
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if not is_oom(e):
                        raise
                    row["status"] = "OOM"
                free_memory(device)  # after the except block, whose traceback holds the failed step's tensors
                rows.append(row)
                print_row(row, flush=True)
                if row.get("status") == "OOM":
                    break
        finish(rows, peak)
    print()
    print(table(rows))
    if reason is not None:
        print(f"\nno TRL row: {reason}")
    print(f"\n{device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, torch "
          f"{torch.__version__}, peak {'%.0f TFLOP/s' % (peak / 1e12) if peak else 'unknown (no MFU)'}; median of "
          f"{args.steps} steps after {args.warmup} warm-up; total {time.perf_counter() - t0:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "device": str(device), "dtype": size.dtype, "lora_r": size.lora_r,
                       "peak_tflops": peak / 1e12 if peak else None, "warmup": args.warmup, "steps": args.steps,
                       "trl_skipped": reason, "checkpoint_info": info, "torch": torch.__version__, "rows": rows},
                      f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
