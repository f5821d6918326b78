"""Streaming shards into batches: split by node and worker, shuffle, decode safely, encode, batch, count skips.

``ShardStream`` is an ``IterableDataset`` that runs inside each DataLoader worker:

    shard list --(seeded shuffle per epoch)--> this rank's shards --> this worker's shards
      --> webdataset tar reading --> decode_sample (allow-listed extensions only)
      --> Encode (chat template, masking, truncation) --> shuffle buffer --> collate --> batch

Each batch carries ``stream`` (worker, index within the worker's stream, epoch) and ``skipped`` (reason -> count
since the previous batch of that worker; samples skipped after a worker's last batch are logged but not counted), so the DataModule can count skipped samples and remember how far each
worker's stream has been consumed: the stream is a deterministic function of (seed, epoch, rank, worker), so
skipping the first n batches of each worker on resume restores the position.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .chat import Encoder, TokenizeError, truncate
from .collate import PairExample, PromptExample, SFTExample, UnpairedExample
from .schema import PreferenceRecord, PromptRecord, RecordError, SFTRecord, UnpairedRecord, with_images
from .shards import SampleError, decode_sample

log = logging.getLogger(__name__)

SkipReason = str


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class Encode:
    """Record + images -> an encoded example for one batch format; raises ``SampleError`` to skip.

    Args:
        encoder: the chat-template encoder of the backbone.
        image_processor: the backbone's image processor (PIL images -> pixel tensors).
        format: ``"sft"``, ``"pairs"``, ``"unpaired"`` or ``"prompts"``.
        max_length: longest sequence in tokens (image tokens included); never cut inside an image.
        num_responses: responses per pair example (2: chosen and rejected; k > 2: the first k ranked candidates).
        prompt_suffix: text appended to the last user turn of every prompt (e.g. SteerLM's attribute request).
    """

    encoder: Encoder
    image_processor: Any
    format: str
    max_length: int = 1024
    num_responses: int = 2
    prompt_suffix: str = ""

    def pixels(self, images) -> torch.Tensor:
        if not images:
            return torch.zeros(0)
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def _prompt(self, turns, n_images):
        turns = with_images(turns, n_images)
        if self.prompt_suffix:
            turns = turns[:-1] + [{"role": "user", "content": turns[-1]["content"] + self.prompt_suffix}]
        return turns

    def __call__(self, record, images) -> Any:
        """The encoded example (or, for ``unpaired`` from a preference record, a list of two)."""
        try:
            return getattr(self, "_" + self.format)(record, images)
        except (RecordError, TokenizeError) as e:
            raise SampleError(getattr(e, "reason", "bad_record"), str(e)) from e

    def _sft(self, record, images):
        if isinstance(record, SFTRecord):
            conv = with_images(record.conversation, len(images))
        elif isinstance(record, PreferenceRecord):
            conv = self._prompt(record.prompt, len(images)) + [{"role": "assistant", "content": record.chosen}]
        elif isinstance(record, PromptRecord) and record.answer:
            conv = self._prompt(record.prompt, len(images)) + [{"role": "assistant", "content": record.answer}]
        elif isinstance(record, UnpairedRecord) and record.label:
            conv = self._prompt(record.prompt, len(images)) + [{"role": "assistant", "content": record.completion}]
        else:
            raise SampleError("wrong_kind", f"a {record.kind} record without an answer cannot train SFT")
        ids, labels = self.encoder.conversation(conv)
        ids, labels, kept = truncate(ids, labels, self.max_length, self.encoder.image_id, self.encoder.image_tokens)
        if kept is not None:
            images = images[:kept]
        if all(l == -100 for l in labels[1:]):
            raise SampleError("too_long", f"nothing left to train on after truncation to {self.max_length} tokens")
        return SFTExample(ids, labels, self.pixels(images), record.id)

    def _pairs(self, record, images):
        if not isinstance(record, PreferenceRecord):
            raise SampleError("wrong_kind", f"a {record.kind} record is not a preference pair")
        k = self.num_responses
        if k == 2:
            texts, refs = [record.chosen, record.rejected], None
            if record.ref_logps and "chosen" in record.ref_logps and "rejected" in record.ref_logps:
                refs = [record.ref_logps["chosen"], record.ref_logps["rejected"]]
        else:
            if not record.candidates or len(record.candidates) < k:
                raise SampleError("few_candidates", f"needs {k} ranked candidates")
            texts = record.candidates[:k]
            refs = (record.ref_logps or {}).get("candidates")
            refs = refs[:k] if refs and len(refs) >= k else None
        turns = self._prompt(record.prompt, len(images))
        prompt = self.encoder.prompt(turns)
        room = self.max_length - len(prompt)
        if room < 1:
            raise SampleError("too_long", f"the prompt alone has {len(prompt)} tokens (max_length {self.max_length})")
        responses = [self.encoder.response(turns, t) for t in texts]
        truncated = any(len(r) > room for r in responses)
        responses = [r[:room] for r in responses]
        ref = None
        if refs is not None:
            if truncated:
                raise SampleError("ref_truncated", "response truncated but its precomputed reference log-probs "
                                  "cover the whole response; raise max_length")
            if any(r.tokens != len(x) for r, x in zip(refs, responses)):
                raise SampleError("ref_mismatch", "precomputed reference log-probs count a different number of "
                                  "tokens: they were made with another tokenizer or template")
            ref = [{"sum": r.sum, "mean": r.mean, "tokens": r.tokens} for r in refs]
        return PairExample(prompt, responses, self.pixels(images), ref, record.id)

    def _unpaired(self, record, images):
        if isinstance(record, UnpairedRecord):
            labelled = [(record.completion, record.label)]
        elif isinstance(record, PreferenceRecord):
            labelled = [(record.chosen, True), (record.rejected, False)]
        else:
            raise SampleError("wrong_kind", f"a {record.kind} record has no response to mark desirable or not")
        turns = self._prompt(record.prompt, len(images))
        prompt = self.encoder.prompt(turns)
        room = self.max_length - len(prompt)
        if room < 1:
            raise SampleError("too_long", f"the prompt alone has {len(prompt)} tokens (max_length {self.max_length})")
        pixels = self.pixels(images)
        return [UnpairedExample(prompt, self.encoder.response(turns, text)[:room], pixels, label, room, record.id)
                for text, label in labelled]

    def _prompts(self, record, images):
        if isinstance(record, (PromptRecord, PreferenceRecord, UnpairedRecord)):
            turns = record.prompt
        else:  # an SFT conversation up to its first answer
            turns = record.conversation[:next(i for i, t in enumerate(record.conversation) if t["role"] == "assistant")]
        turns = self._prompt(turns, len(images))
        prompt = self.encoder.prompt(turns)
        if len(prompt) > self.max_length:
            raise SampleError("too_long", f"the prompt has {len(prompt)} tokens (max_length {self.max_length})")
        meta = {"id": record.id, "prompt": turns, "meta": record.meta,
                "answer": getattr(record, "answer", None) or getattr(record, "chosen", None),
                "objects": getattr(record, "objects", None)}
        return PromptExample(prompt, self.pixels(images), meta)


class _NoWorker:
    id = 0


class ShardStream(IterableDataset):
    """Batches from WebDataset shards (see the module docstring).

    Args:
        urls: shard paths (already expanded).
        encode: record + images -> example (raises ``SampleError`` to skip).
        collate: list of examples -> batch dict.
        batch_size: examples per batch.
        shuffle: shuffle shards (per epoch) and samples (through the buffer).
        shuffle_buffer: samples held for shuffling.
        seed: base seed; the stream is a function of (seed, epoch, rank, worker).
        on_error: ``"skip"`` counts and skips bad samples (the first few are logged with shard and key);
            ``"raise"`` stops at the first one.
        epoch_samples: if set, each rank yields exactly ``epoch_samples / world_size`` samples per epoch,
            cycling over its shards (equal lengths on every rank: no hang at the end of an epoch under DDP or
            DeepSpeed); ``None`` reads each shard once per epoch.
        drop_last: drop a final partial batch.
    """

    def __init__(self, urls: list[str], encode: Callable, collate: Callable, batch_size: int, shuffle: bool = True,
                 shuffle_buffer: int = 1000, seed: int = 0, on_error: str = "skip",
                 epoch_samples: Optional[int] = None, drop_last: bool = False):
        super().__init__()
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not urls:
            raise ValueError("no shards to read")
        self.urls, self.encode, self.collate = list(urls), encode, collate
        self.batch_size, self.shuffle, self.shuffle_buffer = batch_size, shuffle, shuffle_buffer
        self.seed, self.on_error, self.epoch_samples, self.drop_last = seed, on_error, epoch_samples, drop_last
        self.epoch = 0
        self.resume_from: dict[int, int] = {}  # worker -> batches to skip (set by the DataModule on restore)
        self.resume_epoch = 0  # the epoch those positions belong to

    def _shards(self, epoch, rank, world, worker, workers) -> list[str]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(urls)
        slots = world * workers
        if len(urls) < slots and self.epoch_samples is None:
            # fewer shards than readers: every reader gets a disjoint slice of each shard instead
            return urls
        return urls[rank * workers + worker::slots] if len(urls) >= slots else urls

    def _raw(self, urls, stride: int, offset: int) -> Iterator[dict]:
        import webdataset as wds

        n = 0
        for sample in wds.tarfile_to_samples(handler=wds.reraise_exception)(({"url": u} for u in urls)):
            if stride > 1:  # disjoint slice of a shared shard
                n += 1
                if (n - 1) % stride != offset:
                    continue
            yield sample

    def __iter__(self) -> Iterator[dict]:
        # read the epoch and resume position now: the generator body runs later, after the loader reset them
        skip = self.resume_from.get((get_worker_info() or _NoWorker).id, 0) if self.epoch == self.resume_epoch else 0
        return self._iterate(self.epoch, skip)

    def _iterate(self, epoch: int, skip_batches: int) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = rank_and_world()
        slot, slots = rank * workers + worker, world * workers
        urls = self._shards(epoch, rank, world, worker, workers)
        shared = len(self.urls) < slots
        stride, offset = (slots, slot) if shared else (1, 0)
        rng = random.Random(hash((self.seed, epoch, rank, worker)) & 0xFFFFFFFF)
        quota = None if self.epoch_samples is None else self.epoch_samples // slots

        def samples():
            produced, cycle = 0, 0
            while True:
                order = list(urls)
                if cycle and self.shuffle:
                    rng.shuffle(order)
                for raw in self._raw(order, stride, offset):
                    yield raw
                    produced += 1
                cycle += 1
                if quota is None or produced == 0:
                    return

        skipped: Counter = Counter()
        logged = 0
        buffer: list = []
        batch: list = []
        index, yielded = 0, 0

        def emit(examples):
            nonlocal index, skipped
            i = index
            index += 1
            if i < skip_batches:
                skipped = Counter()
                return None
            out = self.collate(examples)
            out["stream"] = {"worker": worker, "index": i, "epoch": epoch, "rank": rank}
            out["skipped"], skipped = dict(skipped), Counter()
            return out

        def examples():
            """Encoded examples in stream order, passed through the shuffle buffer; bad samples are counted."""
            nonlocal logged
            for raw in samples():
                try:
                    record, images = decode_sample(raw)
                    encoded = self.encode(record, images)
                except SampleError as e:
                    if self.on_error == "raise":
                        raise
                    where = f"shard {raw.get('__url__')} key {raw.get('__key__')}"
                    skipped[e.reason] += 1
                    if logged < 5:
                        log.warning("skipping sample (%s): %s%s", e.reason, "" if where in str(e) else where + ": ", e)
                        logged += 1
                    continue
                for example in encoded if isinstance(encoded, list) else [encoded]:
                    if not (self.shuffle and self.shuffle_buffer > 1):
                        yield example
                        continue
                    buffer.append(example)
                    if len(buffer) < self.shuffle_buffer:
                        continue
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
            rng.shuffle(buffer)
            yield from buffer

        for example in examples():
            batch.append(example)
            yielded += 1
            if len(batch) == self.batch_size:
                out = emit(batch)
                batch = []
                if out is not None:
                    yield out
            if quota is not None and yielded >= quota:
                break
        if batch and not self.drop_last:
            out = emit(batch)
            if out is not None:
                yield out
