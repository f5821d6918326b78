"""``ShardDataModule``: WebDataset shards -> batches for whichever LightningModule is training.

The LightningModule says which batches it needs (``batch_spec()``: ``{"format": "sft" | "pairs" | "unpaired" |
"prompts", ...}``) and owns the backbone whose processor encodes them, so one DataModule config serves SFT, the reward
model, DPO and PPO. ``train`` / ``val`` default to the embedded shapes world, which ``prepare_data`` generates
under ``shapes_dir`` when it is missing; point them at your own shards (paths, globs, brace patterns or
directories) to train on real data.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, Optional, Union

import lightning as L
from torch.utils.data import DataLoader

from .chat import Encoder
from .collate import collate_pairs, collate_prompts, collate_sft, collate_unpaired
from .pipeline import Encode, ShardStream
from .shards import expand_urls

# Which shapes-world shards each batch format trains and validates on.
SHAPES_SPLITS = {
    "sft": ("sft/train-*.tar", "sft/val-*.tar"),
    "pairs": ("preference/train-*.tar", "preference/val-*.tar"),
    "unpaired": ("preference/train-*.tar", "preference/val-*.tar"),  # each pair gives a desirable + an undesirable
    "prompts": ("prompts/train-*.tar", "prompts/test-*.tar"),
}


class StreamLoader(DataLoader):
    """A DataLoader that tells its stream which epoch it is in, right before the workers copy it."""

    def __init__(self, *args, epoch_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.epoch_fn = epoch_fn

    def __iter__(self):
        if self.epoch_fn is not None:
            self.dataset.epoch = self.epoch_fn()
        it = super().__iter__()
        self.dataset.resume_from = {}  # a restored position applies to the first iteration only
        return it


class ShardDataModule(L.LightningDataModule):
    """Streams WebDataset shards for SFT, reward-model, DPO and PPO training.

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
        on_error: ``"skip"`` (count bad samples, log the first few with shard and key) or ``"raise"``.
        seed: seed of the shard order and the shuffle buffer.
        prompt_suffix: text appended to every prompt's last user turn (e.g. a SteerLM attribute request).
        padding_side: padding of ``plain`` pair batches (tests use both sides; ``packed`` pads on the right).
    """

    def __init__(self, train: Union[str, list[str]] = "shapes", val: Optional[Union[str, list[str]]] = "shapes",
                 shapes_dir: str = "data/shapes", shapes_train_images: int = 5000, batch_size: int = 8,
                 val_batch_size: Optional[int] = None, max_length: int = 512, num_workers: int = 1,
                 shuffle_buffer: int = 500, epoch_samples: Optional[int] = None, on_error: str = "skip",
                 seed: int = 0, prompt_suffix: str = "", padding_side: str = "right"):
        super().__init__()
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        self.train_urls, self.val_urls = train, val
        self.shapes_dir, self.shapes_train_images = shapes_dir, shapes_train_images
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.max_length, self.num_workers, self.shuffle_buffer = max_length, num_workers, shuffle_buffer
        self.epoch_samples, self.on_error, self.seed = epoch_samples, on_error, seed
        self.prompt_suffix, self.padding_side = prompt_suffix, padding_side
        self.skipped: Counter = Counter()
        self.positions: dict[int, int] = {}
        self._position_epoch = 0
        self._restored: dict[int, int] = {}
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
                      spec.get("num_responses", 2), self.prompt_suffix)

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
                           epoch_samples=epoch_samples)

    def _loader(self, ds: ShardStream, epoch_fn=None) -> DataLoader:
        return StreamLoader(ds, batch_size=None, num_workers=self.num_workers, epoch_fn=epoch_fn,
                            persistent_workers=False, prefetch_factor=2 if self.num_workers else None)

    def train_dataloader(self):
        ds = self.stream("train", True, self.batch_size, self.epoch_samples)
        ds.resume_from, ds.resume_epoch = dict(self._restored), self._position_epoch
        self._restored = {}
        trainer = getattr(self, "_trainer", None)
        return self._loader(ds, epoch_fn=(lambda: trainer.current_epoch) if trainer else None)

    def val_dataloader(self):
        if self.val_urls is None:
            return []
        return self._loader(self.stream("val", False, self.val_batch_size))

    # -------------------------------------------------------------------------------------- accounting
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        stream = batch.pop("stream", None) if isinstance(batch, dict) else None
        skipped = batch.pop("skipped", None) if isinstance(batch, dict) else None
        trainer = getattr(self, "_trainer", None)
        training = trainer is None or trainer.training
        if stream is not None and training:
            if stream["epoch"] != self._position_epoch:
                self.positions, self._position_epoch = {}, stream["epoch"]
            self.positions[stream["worker"]] = stream["index"] + 1
        if skipped and training:
            self.skipped.update(skipped)
        return batch

    def state_dict(self) -> dict:
        """How far each worker's stream was consumed in the current epoch, and the skip counts."""
        return {"epoch": self._position_epoch, "positions": dict(self.positions), "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict):
        self.skipped = Counter(state.get("skipped", {}))
        self._position_epoch = state.get("epoch", 0)
        self.positions = {int(k): v for k, v in state.get("positions", {}).items()}
        self._restored = dict(self.positions)
