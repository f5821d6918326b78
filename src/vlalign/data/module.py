"""``ShardDataModule``: shards -> batches for whichever LightningModule is training, resumable exactly.

The LightningModule says which batches it needs (``batch_spec()``: ``{"format": "sft" | "pairs" | "unpaired" |
"prompts", "ref_logps": bool, ...}``; ``ref_logps``: carry the shards' stored reference log-probs, checked against
this tokenizer, only for a ``precomputed`` reference) and owns the backbone whose processor encodes them, so one
DataModule config serves SFT, the reward model, DPO and PPO. ``train`` / ``val`` default to the embedded shapes
world, which ``prepare_data`` generates under ``shapes_dir`` when it is missing; point them at your own shards
(paths, globs, brace patterns or directories) to train on real data.

**The stream's position in the checkpoint.** Lightning stores ``state_dict()`` under the DataModule's class name::

    {"version": 1,
     "layout": {"world_size", "num_workers", "seed", "shuffle_buffer", "max_length", "max_image_pixels", "format",
                "num_responses", "prompt_suffix", "shards": {"count", "fingerprint"}, "batch_size", "epoch_samples"},
     "ranks": {rank: {"epoch": e,                                   # the epoch the positions belong to
                      "readers": {worker: {"examples": n, "done": bool}},   # consumed by the training loop
                      "last_reader": worker | None,                 # whose batch was consumed last (the phase)
                      "skipped": {reason: count},                   # training skips so far
                      "rng": {"torch", "cuda", "python", "numpy"}}}}  # RNG states (Lightning saves none)

A training batch counts as consumed when it reaches ``on_before_batch_transfer``, i.e. when the loop takes it, not
when the loader prefetches it, so the position and the weights of a checkpoint always agree. ``load_state_dict``
restores the skip counts and the RNG states at once (after the model is built, before the first step) and the next
``train_dataloader()`` resumes every reader where it stopped (``pipeline`` explains how, including the workers'
round-robin phase): the resumed run sees the same batches in the same order as the uninterrupted one.

Resuming under another layout: ``batch_size`` and ``epoch_samples`` may change (every reader continues with its
next unseen example); a change of any other layout entry changes which samples a reader produces, so it is refused
with a message naming the setting (``num_workers`` 0 and 1 are the same layout: one reader per rank).

**Skipped samples**, for logging (``callbacks.DataMonitor`` reads them): ``skipped`` counts training samples per
reason since the run began (restored on resume); ``skipped_val`` counts validation samples per reason in the
latest validation pass. Both are exact: the stream reports every error once (see ``pipeline``).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from functools import partial
from typing import Any, Callable, Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from .chat import Encoder
from .collate import collate_pairs, collate_prompts, collate_sft, collate_unpaired
from .pipeline import Encode, ShardStream, is_accounting, rank_and_world
from .shards import DEFAULT_MAX_PIXELS, expand_urls

# Which shapes-world shards each batch format trains and validates on.
SHAPES_SPLITS = {
    "sft": ("sft/train-*.tar", "sft/val-*.tar"),
    "pairs": ("preference/train-*.tar", "preference/val-*.tar"),
    "unpaired": ("preference/train-*.tar", "preference/val-*.tar"),  # each pair gives a desirable + an undesirable
    "prompts": ("prompts/train-*.tar", "prompts/test-*.tar"),
}

# Layout entries a resume may change: every reader still continues with its next unseen example.
FREE_LAYOUT = ("batch_size", "epoch_samples")
LAYOUT_KEYS = {
    "world_size": "the number of processes (trainer.devices x trainer.num_nodes)",
    "num_workers": "data.num_workers",
    "seed": "data.seed",
    "shuffle_buffer": "data.shuffle_buffer",
    "max_length": "data.max_length",
    "max_image_pixels": "data.max_image_pixels",
    "format": "the model's batch format (model.class_path)",
    "num_responses": "the model's responses per example",
    "prompt_suffix": "data.prompt_suffix",
    "shards": "data.train (the training shard list)",
}


def rng_state() -> dict:
    """The RNG states of this process (torch CPU, the current CUDA device if in use, python, numpy)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def shard_fingerprint(urls: list[str]) -> dict:
    """Count and hash of the shard list by file name (a run moved to another directory still resumes)."""
    names = "\n".join(os.path.basename(u) for u in urls)
    return {"count": len(urls), "fingerprint": hashlib.sha256(names.encode()).hexdigest()[:16]}


def layout_changes(saved: dict, now: dict) -> list[str]:
    """What differs between a checkpoint's stream layout and the current one, as sentences (empty: resumable)."""
    out = []
    for key, what in LAYOUT_KEYS.items():
        if key in saved and saved[key] != now.get(key):
            out.append(f"{what} was {saved[key]!r} and is {now.get(key)!r} now")
    return out


def gather_per_rank(local: dict) -> dict[int, dict]:
    """``{rank: local}`` of every rank (a collective under torch.distributed: every rank must call it)."""
    rank, world = rank_and_world()
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list = [None] * world
        torch.distributed.all_gather_object(out, local)
        return dict(enumerate(out))
    return {rank: local}


class StreamLoader(DataLoader):
    """A DataLoader over a ``ShardStream``: sets the stream's epoch (and, on the first pass after a resume, its
    position) before the workers copy it, and hands accounting items to ``account`` instead of yielding them.

    Args:
        epoch_fn: the epoch of the pass about to start (the Trainer's); ``None`` or a ``None`` result: passes are
            counted from ``first_epoch``.
        account: ``account(stream, skipped, batch=False)`` for every accounting-only item.
        on_start: called when a pass starts (resets per-pass counters).
    Batches carry their own ``stream`` / ``skipped``: the consumer accounts for them when it takes them.
    The loader has its own ``generator``, so starting a pass never draws from the global torch RNG (a resumed run
    starts passes at other moments than the uninterrupted one, and dropout must not notice).
    """

    def __init__(self, dataset: ShardStream, *args, epoch_fn: Optional[Callable[[], Optional[int]]] = None,
                 account: Optional[Callable] = None, on_start: Optional[Callable[[], None]] = None,
                 first_epoch: int = 0, **kwargs):
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(dataset, *args, **kwargs)
        self.epoch_fn, self.account, self.on_start = epoch_fn, account, on_start
        self.next_epoch = first_epoch

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self.dataset.epoch = self.next_epoch if epoch is None else epoch
        self.next_epoch = self.dataset.epoch + 1
        if self.on_start is not None:
            self.on_start()
        it = super().__iter__()
        self.dataset.resume, self.dataset.phase = {}, 0  # a restored position applies to one pass only
        return self._batches(it)

    def _batches(self, it):
        for item in it:
            if is_accounting(item):
                if self.account is not None:
                    self.account(item["stream"], item["skipped"], batch=False)
                continue
            yield item


def _check_settings(**values):
    """Refuse impossible data settings at start-up (before any model is built), naming the YAML key."""
    at_least = {"batch_size": 1, "val_batch_size": 1, "max_length": 2, "num_workers": 0, "shuffle_buffer": 0,
                "epoch_samples": 1, "max_image_pixels": 1, "shapes_train_images": 1}
    for name, low in at_least.items():
        value = values[name]
        if value is None and name in ("val_batch_size", "epoch_samples"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")
    for name, allowed in (("on_error", ("skip", "raise")), ("padding_side", ("left", "right"))):
        if values[name] not in allowed:
            raise ValueError(f"data.{name} must be one of {allowed}, got {values[name]!r}")


class ShardDataModule(L.LightningDataModule):
    """Streams shards for SFT, reward-model, DPO and PPO training (checkpointed position: see the module docstring).

    Args:
        train: training shards (paths, globs, ``{000..009}`` patterns, directories); ``"shapes"`` for the
            embedded default world.
        val: validation shards, ``"shapes"``, or ``None`` for no validation.
        shapes_dir: where the embedded shapes world lives (built by ``prepare_data`` when missing).
        shapes_train_images: training images of the shapes world (when it is built here).
        batch_size: examples per batch and process (a pair or ranked list counts as one example).
        val_batch_size: defaults to ``batch_size``.
        max_length: longest sequence in tokens, image tokens included; sequences are cut at the end and never
            inside an image (a cut that would fall inside one ends the sequence before that image).
        num_workers: DataLoader worker processes per rank (each reads a disjoint share of the shards).
        shuffle_buffer: samples kept in the shuffle buffer of each worker (0 or 1: no sample shuffling).
        epoch_samples: samples per epoch across all ranks, cycling over shards as needed; set it on several
            GPUs so every rank sees the same number of batches. ``None``: one pass over the shards.
        on_error: ``"skip"`` (count bad samples per reason, log the first of each reason with shard and key) or
            ``"raise"`` (stop at the first, naming shard, key and reason).
        seed: seed of the shard order and the shuffle buffer (epochs reshuffle: the order is a function of seed
            and epoch).
        prompt_suffix: text appended to every prompt's last user turn (e.g. a SteerLM attribute request).
        padding_side: padding of ``plain`` pair batches (tests use both sides; ``packed`` pads on the right).
        max_image_pixels: largest image (width x height) a sample may have; checked from the image header before
            decoding, larger ones are skipped (``image_too_large``). Default ``shards.DEFAULT_MAX_PIXELS``.
    """

    def __init__(self, train: Union[str, list[str]] = "shapes", val: Optional[Union[str, list[str]]] = "shapes",
                 shapes_dir: str = "data/shapes", shapes_train_images: int = 5000, batch_size: int = 8,
                 val_batch_size: Optional[int] = None, max_length: int = 512, num_workers: int = 1,
                 shuffle_buffer: int = 500, epoch_samples: Optional[int] = None, on_error: str = "skip",
                 seed: int = 0, prompt_suffix: str = "", padding_side: str = "right",
                 max_image_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__()
        _check_settings(batch_size=batch_size, val_batch_size=val_batch_size, max_length=max_length,
                        num_workers=num_workers, shuffle_buffer=shuffle_buffer, epoch_samples=epoch_samples,
                        on_error=on_error, padding_side=padding_side, max_image_pixels=max_image_pixels,
                        shapes_train_images=shapes_train_images)
        for name, value in (("train", train), ("val", val)):
            if value not in (None, "shapes") and not expand_urls(value):
                raise FileNotFoundError(f"data.{name}: no shards match {value!r} (paths, globs, {{a..b}} patterns "
                                        "or directories of .tar files)")
        self.train_urls, self.val_urls = train, val
        self.shapes_dir, self.shapes_train_images = shapes_dir, shapes_train_images
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.max_length, self.num_workers, self.shuffle_buffer = max_length, num_workers, shuffle_buffer
        self.epoch_samples, self.on_error, self.seed = epoch_samples, on_error, seed
        self.prompt_suffix, self.padding_side = prompt_suffix, padding_side
        self.max_image_pixels = max_image_pixels
        self.skipped: Counter = Counter()
        self.skipped_val: Counter = Counter()
        self._epoch = 0  # the training epoch the reader positions below belong to
        self._readers: dict[int, dict] = {}  # reader -> {"examples": consumed, "done": its final item consumed}
        self._last_reader: Optional[int] = None  # the reader whose batch the loop took last
        self._restored: Optional[dict] = None  # a checkpoint's position, for the next train_dataloader()
        self._spec: Optional[dict] = None
        self._backbone = None

    # --------------------------------------------------------------------------------------------- setup
    def _uses_shapes(self) -> bool:
        return "shapes" in (self.train_urls, self.val_urls)

    def prepare_data(self):
        if self._uses_shapes():
            from .shapes import ensure_shapes

            ensure_shapes(self.shapes_dir, train_images=self.shapes_train_images)

    def attach(self, backbone, spec: dict):
        """Use ``backbone``'s processor and produce batches per ``spec`` (done by ``setup`` under a Trainer)."""
        self._backbone, self._spec = backbone, dict(spec)

    def setup(self, stage: Optional[str] = None):
        if self._spec is None:
            module = self.trainer.lightning_module
            self.attach(module.backbone, module.batch_spec())
        # Lightning's DeepSpeed strategy reads the micro-batch size off the DataLoader's batch sampler, which a
        # stream that batches inside its workers does not have: tell it directly.
        config = getattr(getattr(self.trainer, "strategy", None), "config", None)
        if isinstance(config, dict) and "train_micro_batch_size_per_gpu" not in config:
            config["train_micro_batch_size_per_gpu"] = self.batch_size

    def _urls(self, which: str) -> list[str]:
        value = self.train_urls if which == "train" else self.val_urls
        if value == "shapes":
            fmt = self._spec["format"]
            pattern = SHAPES_SPLITS[fmt][0 if which == "train" else 1]
            value = f"{self.shapes_dir}/{pattern}"
        urls = expand_urls(value)
        if not urls:
            raise FileNotFoundError(f"no {which} shards match {value!r}")
        return urls

    def _encode(self, max_length=None) -> Encode:
        bb, spec = self._backbone, self._spec
        encoder = Encoder(bb.tokenizer, bb.processor.chat_template, bb.num_image_tokens)
        return Encode(encoder, bb.processor.image_processor, spec["format"], max_length or self.max_length,
                      spec.get("num_responses", 2), self.prompt_suffix, use_ref_logps=bool(spec.get("ref_logps")))

    def _collate(self):
        fmt, pad = self._spec["format"], self._backbone.tokenizer.pad_token_id
        if fmt == "sft":
            return partial(collate_sft, pad_id=pad)
        if fmt == "pairs":
            return partial(collate_pairs, pad_id=pad, layout=self._spec.get("layout", "packed"),
                           padding_side=self.padding_side)
        if fmt == "unpaired":
            return partial(collate_unpaired, pad_id=pad, layout=self._spec.get("layout", "packed"),
                           padding_side=self.padding_side)
        if fmt == "prompts":
            return partial(collate_prompts, pad_id=pad)
        raise ValueError(f"unknown batch format {fmt!r}")

    def stream(self, which: str, shuffle: bool, batch_size: int, epoch_samples=None) -> ShardStream:
        return ShardStream(self._urls(which), self._encode(), self._collate(), batch_size, shuffle=shuffle,
                           shuffle_buffer=self.shuffle_buffer, seed=self.seed, on_error=self.on_error,
                           epoch_samples=epoch_samples, max_pixels=self.max_image_pixels, split=which)

    def _loader(self, ds: ShardStream, **kwargs) -> StreamLoader:
        return StreamLoader(ds, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                            prefetch_factor=2 if self.num_workers else None, account=self._account, **kwargs)

    def train_dataloader(self):
        ds = self.stream("train", True, self.batch_size, self.epoch_samples)
        first_epoch = self._resume(ds)
        return self._loader(ds, epoch_fn=lambda: None if self.trainer is None else self.trainer.current_epoch,
                            first_epoch=first_epoch)

    def val_dataloader(self):
        if self.val_urls is None:
            return []
        return self._loader(self.stream("val", False, self.val_batch_size), on_start=lambda: self.skipped_val.clear())

    # -------------------------------------------------------------------------------------- accounting
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """The loop takes a batch: count its skips and advance its reader's position."""
        if isinstance(batch, dict) and "stream" in batch:
            self._account(batch.pop("stream"), batch.pop("skipped", None) or {}, batch=True)
        return batch

    def _account(self, stream: dict, skipped: dict, batch: bool):
        if stream["split"] != "train":
            self.skipped_val.update(skipped)
            return
        self.skipped.update(skipped)
        if stream["epoch"] != self._epoch:
            self._epoch, self._readers, self._last_reader = stream["epoch"], {}, None
        self._readers[stream["worker"]] = {"examples": stream["end"], "done": stream["final"]}
        if batch:
            self._last_reader = stream["worker"]

    # -------------------------------------------------------------------------------------- checkpoint
    def _layout(self) -> dict:
        spec = self._spec or {}
        return {"world_size": rank_and_world()[1], "num_workers": max(1, self.num_workers), "seed": self.seed,
                "shuffle_buffer": self.shuffle_buffer, "max_length": self.max_length,
                "max_image_pixels": self.max_image_pixels, "format": spec.get("format"),
                "num_responses": spec.get("num_responses", 2), "prompt_suffix": self.prompt_suffix,
                "shards": shard_fingerprint(self._urls("train")) if spec else None,
                "batch_size": self.batch_size, "epoch_samples": self.epoch_samples}

    def state_dict(self) -> dict:
        """The stream position of every rank and reader, the skip counts and RNG states, and the layout."""
        local = {"epoch": self._epoch, "readers": {w: dict(p) for w, p in self._readers.items()},
                 "last_reader": self._last_reader, "skipped": dict(self.skipped), "rng": rng_state()}
        return {"version": 1, "layout": self._layout(), "ranks": gather_per_rank(local)}

    def load_state_dict(self, state: dict):
        """Restore skip counts and RNG states now; the position is checked and applied by ``train_dataloader``."""
        if "ranks" not in state or "layout" not in state:
            raise ValueError("this checkpoint's data state has no per-rank stream position (it was written before "
                             "exact resume existed): its data order cannot be continued. Start a new run from its "
                             "weights instead of resuming it with --ckpt_path.")
        rank = rank_and_world()[0]
        mine = state["ranks"].get(rank)
        if mine is not None:
            self.skipped = Counter(mine.get("skipped", {}))
            if mine.get("rng"):
                set_rng_state(mine["rng"])
        self._restored = {"layout": state["layout"], "rank": mine}

    def _resume(self, ds: ShardStream) -> int:
        """Apply a restored position to ``ds`` (refusing a changed layout); returns the epoch to start at."""
        restored, self._restored = self._restored, None
        if restored is None:
            return 0
        changes = layout_changes(restored["layout"], self._layout())
        if restored["rank"] is None and not changes:
            changes = [f"this rank ({rank_and_world()[0]}) has no saved position"]
        if changes:
            raise ValueError("cannot resume the training data stream where the checkpoint left it: "
                             + "; ".join(changes) + ". Set these back to the checkpoint's values to resume "
                             "exactly, or start a new run from the checkpoint's weights (without --ckpt_path).")
        mine = restored["rank"]
        self._epoch, self._last_reader = mine["epoch"], mine["last_reader"]
        self._readers = {int(w): dict(p) for w, p in mine["readers"].items()}
        ds.resume, ds.resume_epoch = {w: dict(p) for w, p in self._readers.items()}, self._epoch
        ds.phase = 0 if self._last_reader is None else (self._last_reader + 1) % max(1, self.num_workers)
        return self._epoch
