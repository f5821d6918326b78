"""Streaming shards into batches: plain stages, exact skip counts, a position that resumes exactly.

``ShardStream`` is an ``IterableDataset``. Each reader (one per rank and DataLoader worker; the main process when
``num_workers=0``) runs the same chain of small generators over its share of the shards:

    read      ``iter_shard(url)`` over this reader's shards         -> raw sample | SampleError
    decode    ``decode_sample(raw, max_pixels)`` (allow-listed)      -> (where, record, images) | SampleError
    encode    ``Encode`` (chat template, masking, truncation)        -> example(s) | SampleError
    check     ``on_error``: ``raise`` the error, or log the first of each reason and pass it on to be counted
    shuffle   a seeded buffer of examples (errors pass straight through, so they are counted when read)
    limit     ``epoch_samples``: this reader's quota of examples per epoch
    batch     examples -> batches; errors counted per reason between batches

Every failure is caught in the stage where it happens and travels on as a ``SampleError`` (reason, shard, key);
nothing but ``check`` decides what happens to it. A reader's shards: the shard list, shuffled per epoch with
``seed``, dealt round-robin to the ``world_size * num_workers`` readers; with fewer shards than readers every
reader reads every shard and keeps every ``readers``-th item (samples and errors alike), so each sample and each
error belongs to exactly one reader.

**Items.** The stream yields dicts. Each carries ``stream`` = ``{"split", "rank", "worker", "epoch", "end",
"final"}`` (``end``: examples this reader has produced up to and including this item; ``final``: the reader's last
item of the epoch) and ``skipped`` = ``{reason: count}`` of the errors read since the reader's previous item. A
batch item also holds the collated batch. The last batch is held back until the reader ends, so that errors read
after it are counted with it; a reader that produces no batch at all but has errors yields one *accounting* item
(``stream`` and ``skipped`` only, ``is_accounting``) that the DataModule's loader consumes and never hands to the
model. So the sum of ``skipped`` over all items is exactly the errors met, per reason, on every reader.

**Resume.** A reader's stream is a pure function of (shards, seed, epoch, rank, worker, layout): its position is
the number of examples the main process has consumed from it (and whether its final item was consumed). On
resume each reader regenerates its stream, drops that many examples uncounted (and the errors read before the
last of them), and continues; batch boundaries restart there, so a changed ``batch_size`` still continues with
the next unseen example. The DataLoader hands out its workers' items round-robin, worker 0 first, dropping a
worker from the cycle once it has ended. To continue that cycle where it stopped, a resumed loader *rotates* the
readers' roles: loader worker ``i`` plays reader ``(i + phase) % num_workers``, with ``phase`` the reader after the
one whose batch was consumed last. The merged order after a resume is then the uninterrupted one, for any number
of workers. (Accounting items never set the phase: each is its reader's last item, and a reader that has ended is
dropped from the cycle either way.) This was chosen over making the order independent of ``num_workers``
(virtual reader slots): it needs no change to how workers split the shards. The cost: a resumed reader re-reads and re-encodes the consumed
part of its epoch (not collated), in its worker, in parallel with the other workers.

Epochs reshuffle: the shard order and every reader's shuffle buffer are seeded by (``seed``, epoch, reader).
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .chat import Encoder, TokenizeError, truncate
from .collate import PairExample, PromptExample, SFTExample, UnpairedExample
from .schema import PreferenceRecord, PromptRecord, RecordError, SFTRecord, UnpairedRecord, with_images
from .shards import DEFAULT_MAX_PIXELS, SampleError, decode_sample, iter_shard

log = logging.getLogger(__name__)


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
        use_ref_logps: carry a record's stored reference log-probs into ``pairs`` examples, after checking their
            token counts against this tokenizer (``ref_mismatch``). Only a ``precomputed`` reference reads them
            (``batch_spec()["ref_logps"]``); any other run ignores them, whatever tokenizer made them.
    """

    encoder: Encoder
    image_processor: Any
    format: str
    max_length: int = 1024
    num_responses: int = 2
    prompt_suffix: str = ""
    use_ref_logps: bool = True

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
        stored = (record.ref_logps or {}) if self.use_ref_logps else {}
        if k == 2:
            texts, refs = [record.chosen, record.rejected], None
            if "chosen" in stored and "rejected" in stored:
                refs = [stored["chosen"], stored["rejected"]]
        else:
            if not record.candidates or len(record.candidates) < k:
                raise SampleError("few_candidates", f"needs {k} ranked candidates")
            texts = record.candidates[:k]
            refs = stored.get("candidates")
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



# ----------------------------------------------------------------------------------------------------- the stages
# Each stage takes an iterator of items and passes every ``SampleError`` through unchanged (after filling its
# shard and key), so errors keep their place in read order.

Where = tuple[str, str]  # (shard, key)


def read(urls: Iterable[str], stride: int = 1, offset: int = 0) -> Iterator[Union[dict, SampleError]]:
    """Raw samples and read errors of ``urls`` in order; with ``stride > 1`` only items ``offset``,
    ``offset + stride``, ... (a disjoint share of shards that several readers read)."""
    n = 0
    for url in urls:
        for item in iter_shard(url):
            n += 1
            if (n - 1) % stride != offset:
                continue
            yield item.at(url, None) if isinstance(item, SampleError) else item


def decode(items: Iterable, max_pixels: int) -> Iterator[Union[tuple[Where, Any, list], SampleError]]:
    """Raw samples -> ``((shard, key), record, images)``; a sample that does not decode -> its ``SampleError``."""
    for raw in items:
        if isinstance(raw, SampleError):
            yield raw
            continue
        where = (raw.get("__url__"), raw.get("__key__"))
        try:
            record, images = decode_sample(raw, max_pixels=max_pixels)
        except SampleError as e:
            yield e.at(*where)
            continue
        yield where, record, images


def encode(items: Iterable, fn: Callable) -> Iterator[Any]:
    """Decoded samples -> encoded examples (``fn`` may return a list: one record, several examples)."""
    for item in items:
        if isinstance(item, SampleError):
            yield item
            continue
        where, record, images = item
        try:
            out = fn(record, images)
        except SampleError as e:
            yield e.at(*where)
            continue
        yield from out if isinstance(out, list) else [out]


def check(items: Iterable, on_error: str) -> Iterator[Any]:
    """``on_error="raise"``: raise the first error (its message names shard, key and reason). ``"skip"``: log the
    first error of each reason (later ones are only counted) and pass every error on to be counted."""
    logged: set[str] = set()
    for item in items:
        if isinstance(item, SampleError):
            if on_error == "raise":
                raise item
            if item.reason not in logged:
                logged.add(item.reason)
                log.warning("skipping a sample (%s): %s (further '%s' skips on this reader are counted, not logged)",
                            item.reason, item, item.reason)
        yield item


def shuffle(items: Iterable, rng: random.Random, size: int) -> Iterator[Any]:
    """A shuffle buffer of ``size`` examples (``size <= 1``: order kept); errors are not held back."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if isinstance(item, SampleError):
            yield item
            continue
        buffer.append(item)
        if len(buffer) < size:
            continue
        j = rng.randrange(len(buffer))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def limit(items: Iterable, quota: Optional[int]) -> Iterator[Any]:
    """Stop after ``quota`` examples (``None``: no limit); errors read before the last of them pass."""
    if quota is None:
        yield from items
        return
    n = 0
    for item in items if quota > 0 else ():
        yield item
        if not isinstance(item, SampleError):
            n += 1
            if n >= quota:
                return


def batch(items: Iterable, size: int, drop_last: bool = False, start: int = 0
          ) -> Iterator[tuple[Optional[list], Counter, int, bool]]:
    """Examples and errors -> ``(examples | None, skipped, end, final)``.

    ``skipped`` counts the errors (per reason) read since the previous batch; ``end`` is the number of examples
    produced so far; ``final`` marks the last item. The last batch is held back until the input ends so that
    errors after it are counted with it; without any batch, remaining errors come as ``(None, skipped, end, True)``.
    ``start``: examples consumed before a resume; they and the errors read before the last of them are dropped.
    """
    skipped: Counter = Counter()
    group: list = []
    held = None
    n = 0
    for item in items:
        if isinstance(item, SampleError):
            skipped[item.reason] += 1
            continue
        n += 1
        if n <= start:
            if n == start:
                skipped = Counter()
            continue
        group.append(item)
        if len(group) == size:
            if held is not None:
                yield held
            held, group, skipped = (group, skipped, n, False), [], Counter()
    if group and not drop_last:
        if held is not None:
            yield held
        held, skipped = (group, skipped, n, False), Counter()
    if held is not None:
        examples, counts, end, _ = held
        yield examples, counts + skipped, end, True
    elif skipped:
        yield None, skipped, n, True


def passes(make: Callable[[int], Iterator], repeat: bool) -> Iterator[Any]:
    """``make(0)``, then (``repeat``) ``make(1)``, ... until a pass yields no example (nothing left to cycle)."""
    cycle = 0
    while True:
        good = 0
        for item in make(cycle):
            good += not isinstance(item, SampleError)
            yield item
        cycle += 1
        if not repeat or good == 0:
            return


def is_accounting(item: dict) -> bool:
    """An item that only reports skips (a reader without batches): count it, never train on it."""
    return set(item) <= {"stream", "skipped"}


class ShardStream(IterableDataset):
    """Batches from shards (see the module docstring for the stages, the items and how a position resumes).

    Args:
        urls: shard paths (already expanded).
        encode: record + images -> example (raises ``SampleError`` to skip).
        collate: list of examples -> batch dict.
        batch_size: examples per batch.
        shuffle: shuffle shards (per epoch) and samples (through the buffer).
        shuffle_buffer: samples held for shuffling.
        seed: base seed; the stream is a function of (seed, epoch, rank, worker).
        on_error: ``"skip"`` counts and skips bad samples (the first of each reason is logged with shard and
            key); ``"raise"`` stops at the first one.
        epoch_samples: if set, each rank yields exactly ``epoch_samples / world_size`` samples per epoch,
            cycling over its shards (equal lengths on every rank: no hang at the end of an epoch under DDP or
            DeepSpeed); ``None`` reads each shard once per epoch.
        drop_last: drop a final partial batch.
        max_pixels: largest image (width x height) decoded; larger ones are skipped before decoding.
        split: ``"train"`` or ``"val"``, carried by every item so the consumer knows whose skips they are.

    Set by the loader before each pass (then copied into the workers): ``epoch``; for the first pass after a
    resume also ``resume`` (reader -> ``{"examples", "done"}``), ``resume_epoch`` and ``phase``.
    """

    def __init__(self, urls: list[str], encode: Callable, collate: Callable, batch_size: int, shuffle: bool = True,
                 shuffle_buffer: int = 1000, seed: int = 0, on_error: str = "skip",
                 epoch_samples: Optional[int] = None, drop_last: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, split: str = "train"):
        super().__init__()
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not urls:
            raise ValueError("no shards to read")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.urls, self.encode, self.collate = list(urls), encode, collate
        self.batch_size, self.shuffle, self.shuffle_buffer = batch_size, shuffle, shuffle_buffer
        self.seed, self.on_error, self.epoch_samples, self.drop_last = seed, on_error, epoch_samples, drop_last
        self.max_pixels, self.split = max_pixels, split
        self.epoch = 0
        self.resume: dict[int, dict] = {}
        self.resume_epoch = 0
        self.phase = 0

    def _share(self, epoch: int, slot: int, slots: int) -> tuple[list[str], int, int]:
        """(shards, stride, offset) of reader ``slot`` of ``slots``."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"shards/{self.seed}/{epoch}").shuffle(urls)
        if len(urls) < slots:  # fewer shards than readers: all read everything, each keeps its share
            return urls, slots, slot
        return urls[slot::slots], 1, 0

    def __iter__(self) -> Iterator[dict]:
        # decide the reader's role and position now: the generator body runs later, after the loader reset them
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        resuming = self.epoch == self.resume_epoch
        worker = (loader_worker + (self.phase if resuming else 0)) % workers
        position = self.resume.get(worker) if resuming else None
        return self._iterate(self.epoch, worker, workers, position)

    def _iterate(self, epoch: int, worker: int, workers: int, position: Optional[dict]) -> Iterator[dict]:
        if position and position.get("done"):
            return
        rank, world = rank_and_world()
        slot, slots = rank * workers + worker, world * workers
        urls, stride, offset = self._share(epoch, slot, slots)
        rng = random.Random(f"samples/{self.seed}/{epoch}/{slot}")
        quota = None if self.epoch_samples is None else self.epoch_samples // slots

        def one_pass(cycle: int) -> Iterator:
            order = list(urls)
            if cycle and self.shuffle:
                rng.shuffle(order)
            return encode(decode(read(order, stride, offset), self.max_pixels), self.encode)

        items = check(passes(one_pass, repeat=quota is not None), self.on_error)
        if self.shuffle:
            items = shuffle(items, rng, self.shuffle_buffer)
        items = limit(items, quota)
        meta = {"split": self.split, "rank": rank, "worker": worker, "epoch": epoch}
        start = position["examples"] if position else 0
        for examples, skipped, end, final in batch(items, self.batch_size, self.drop_last, start):
            out = self.collate(examples) if examples else {}
            out["stream"] = {**meta, "end": end, "final": final}
            out["skipped"] = dict(skipped)
            yield out
