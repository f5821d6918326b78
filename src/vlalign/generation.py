"""Inference shared by ``data_prep/`` and ``eval/``: load a model, read prompt samples, generate in batches.

    from vlalign.generation import Sampling, View, load_model, read_samples, prompt_encode, generate_views
    bb = load_model("runs/dpo/export")                      # an export dir, or its merged/ checkpoint
    encode = prompt_encode(bb)
    for record, images, texts in generate_views(bb, read_samples("prompts-*.tar"), {"answer": View()}, encode):
        print(record.id, texts["answer"])

Models it loads (``load_model``):

* a merged checkpoint directory (``Backbone.export_merged`` output, or any local transformers LLaVA directory);
* a training export directory holding ``merged/`` (what ``export_dir`` of the SFT / DPO / PPO modules writes);
* a LoRA adapter directory (``adapter/``, peft format) together with ``base=`` its base checkpoint.

Lightning ``.ckpt`` files are not loaded here: they are pickles, and they hold the trainable weights only (the
modules set ``strict_loading = False`` and rebuild everything else from their config's base checkpoint or the
tiny default's seed), so they are not a model on their own. Export them first: a module's ``export_dir`` writes
``merged/`` (safetensors) at the end of ``fit``.

Generation is batched over left-padded prompts (``collate_prompts``), greedy by default. A ``View`` says how one
answer per prompt is produced: its ``Sampling`` options and two optional hooks that let SeVa answer on an
augmented image: ``image_transform`` changes the PIL images before the image processor (crops, colour jitter,
...), ``pixel_transform`` changes the processed ``(n_images, 3, H, W)`` tensor (diffusion noise on the
CLIP-normalised pixels). Both receive the record id so they can seed themselves per record: the output of a
record then does not depend on the batch it was in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from PIL import Image

from .backbone import DTYPES, Backbone, BackboneConfig
from .data.chat import Encoder
from .data.collate import PromptExample, collate_prompts
from .data.pipeline import Encode
from .data.schema import PreferenceRecord, PromptRecord, Record, SFTRecord
from .data.shards import DEFAULT_MAX_PIXELS, SampleError, decode_sample, expand_urls, iter_shard

log = logging.getLogger(__name__)

ImageTransform = Callable[[list, str], list]  # (PIL images, record id) -> PIL images
PixelTransform = Callable[[torch.Tensor, str], torch.Tensor]  # ((n_images, 3, H, W), record id) -> same shape


# ---------------------------------------------------------------------------------------------------- models
def resolve_model(path: str) -> str:
    """The checkpoint directory behind ``path``: itself when it holds ``config.json``, else its ``merged/``."""
    if path.endswith(".ckpt") or os.path.isfile(path):
        raise ValueError(f"{path} is a file: Lightning checkpoints hold the trainable weights only and are not "
                         "loaded for inference; give the module's export_dir (its merged/ checkpoint)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "merged", "config.json")):
        return os.path.join(path, "merged")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ValueError(f"{path} is a LoRA adapter: give its base checkpoint too (load_model(path, base=...))")
    raise FileNotFoundError(f"{path} is neither a LLaVA checkpoint directory nor an export dir with merged/")


def load_model(path: str, base: Optional[str] = None, dtype: str = "float32",
               device: Optional[str] = None) -> Backbone:
    """A frozen ``Backbone`` in eval mode for inference (see the module docstring for what ``path`` may be).

    base: the base checkpoint when ``path`` is a LoRA adapter directory.
    device: ``"cuda"``, ``"cpu"``, ...; default: CUDA when available.
    """
    if base is not None:
        cfg = BackboneConfig(checkpoint=resolve_model(base), adapter=path, train_vision=False, train_projector=False,
                             train_language=False, dtype=dtype)
    else:
        cfg = BackboneConfig(checkpoint=resolve_model(path), train_vision=False, train_projector=False,
                             train_language=False, dtype=dtype)
    bb = Backbone(cfg).build()
    bb.requires_grad_(False)
    bb.eval()
    return bb.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def model_fingerprint(path: str) -> str:
    """``<dir name>@<12 hex>``: a name for a checkpoint that changes whenever its weights do.

    A BLAKE2 hash of ``config.json`` and every weight file, read in full: sampling parts of the files would
    miss a run that changed only a small projector. Costs one read of the checkpoint (seconds per GB).
    """
    ckpt = resolve_model(path)
    h = hashlib.blake2b(digest_size=16)
    names = sorted(f for f in os.listdir(ckpt) if f == "config.json" or f.endswith((".safetensors", ".bin")))
    for name in names:
        h.update(name.encode())
        with open(os.path.join(ckpt, name), "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    ckpt = os.path.normpath(ckpt)
    # a training export's merged/ is named after the export dir around it
    label = os.path.basename(os.path.dirname(ckpt) if os.path.basename(ckpt) == "merged" else ckpt)
    return f"{label}@{h.hexdigest()[:12]}"


# --------------------------------------------------------------------------------------------------- samples
def read_samples(urls: str | Sequence[str], limit: Optional[int] = None, skipped: Optional[Counter] = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[Record, list[Image.Image]]]:
    """Decoded ``(record, images)`` from local shards, in order: the first ``limit`` good samples.

    Read as training reads them: the project's tar reader (``iter_shard``) and allow-listed decoding
    (``decode_sample``: nothing is unpickled, images over ``max_pixels`` = width x height are refused from their
    header). A bad sample, or a damaged shard (truncated, corrupt header, unreadable), is a ``SampleError``: with
    ``skipped`` (a ``Counter``) it is counted under its reason (``shard_truncated``, ``bad_image``,
    ``image_too_large``, ...), the first of each reason is logged with shard and key, and reading goes on with the
    next good sample (after a corrupt header the reader resynchronises, so later samples of that shard still
    arrive); without ``skipped`` it is raised. ``limit`` counts good samples only.
    """
    paths = expand_urls(urls)
    if not paths:
        raise FileNotFoundError(f"no shards match {urls!r}")
    if limit is not None and limit <= 0:
        return
    n = 0
    for url in paths:
        for raw in iter_shard(url):
            try:
                if isinstance(raw, SampleError):
                    raise raw
                sample = decode_sample(raw, max_pixels=max_pixels)
            except SampleError as e:
                if skipped is None:
                    raise
                if not skipped[e.reason]:
                    log.warning("skipping a sample (%s): %s (further '%s' skips are counted, not logged)",
                                e.reason, e, e.reason)
                skipped[e.reason] += 1
                continue
            yield sample
            n += 1
            if limit is not None and n >= limit:
                return


def count_samples(urls: str | Sequence[str]) -> int:
    """About how many records local shards hold (their ``.json`` members; tar headers only), for progress bars.

    An estimate, never an error: a missing, empty or unreadable shard counts 0 and a damaged one the records before
    the damage (``read_samples`` reports those faults, sample by sample).
    """
    import tarfile

    n = 0
    for p in expand_urls(urls):
        if not os.path.isfile(p):
            continue
        try:
            with tarfile.open(p) as tar:
                for m in tar:
                    n += m.name.endswith(".json")
        except (tarfile.TarError, OSError, EOFError):
            continue
    return n


def as_prompt(record: Record) -> PromptRecord:
    """Any record as a prompt: a preference record's prompt (its chosen answer as the reference ``answer``), an
    SFT conversation up to its first assistant turn (that turn as the answer)."""
    if isinstance(record, PromptRecord):
        return record
    if isinstance(record, PreferenceRecord):
        return PromptRecord(record.id, record.prompt, record.chosen, None, dict(record.meta))
    if isinstance(record, SFTRecord):
        conv = record.conversation
        first = next(i for i, t in enumerate(conv) if t["role"] == "assistant")
        return PromptRecord(record.id, conv[:first], conv[first]["content"], None, dict(record.meta))
    raise TypeError(f"not a record: {type(record).__name__}")


def prompt_encode(backbone: Backbone, max_length: int = 1024, prompt_suffix: str = "") -> Encode:
    """The training pipeline's ``Encode(format="prompts")`` for this backbone (same template and image tokens)."""
    encoder = Encoder(backbone.tokenizer, backbone.processor.chat_template, backbone.num_image_tokens)
    return Encode(encoder, backbone.processor.image_processor, "prompts", max_length, prompt_suffix=prompt_suffix)


def record_seed(seed: int, record_id: str, salt: str = "") -> int:
    """A stable 31-bit seed for one record (``hash()`` of a str changes between Python processes)."""
    return (zlib.crc32(f"{seed}/{salt}/{record_id}".encode()) ^ seed) & 0x7FFFFFFF


# -------------------------------------------------------------------------------------------------- generate
@dataclass
class Sampling:
    """Decoding options. Greedy unless ``do_sample`` (SIMA's sample: temperature 0.8, top_p 0.9).

    Args:
        max_new_tokens: longest answer in tokens.
        do_sample: sample instead of greedy decoding.
        temperature / top_p / top_k: sampling options (``top_k: 0`` is off).
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class View:
    """One way of answering every prompt: decoding options plus optional image hooks (module docstring)."""

    sampling: Sampling = field(default_factory=Sampling)
    image_transform: Optional[ImageTransform] = None
    pixel_transform: Optional[PixelTransform] = None


def encode_view(encode: Encode, record: Record, images: list, view: View) -> PromptExample:
    """A prompt example for ``record`` as ``view`` sees it (transformed images); raises ``SampleError``."""
    if view.image_transform is not None and images:
        images = view.image_transform(list(images), record.id)
    example = encode(record, images)
    if view.pixel_transform is not None and example.pixel_values.numel():
        example.pixel_values = view.pixel_transform(example.pixel_values, record.id)
    return example


def generate(backbone: Backbone, examples: list[PromptExample], sampling: Sampling = Sampling(),
             seed: Optional[int] = None) -> list[str]:
    """One decoded answer per example (special tokens dropped, whitespace stripped).

    seed: seeds torch's global generator before sampling (``generate`` draws from it), so a batch's samples
    are reproducible.
    """
    if not examples:
        return []
    batch = collate_prompts(examples, backbone.tokenizer.pad_token_id)
    device = next(backbone.parameters()).device
    if sampling.do_sample and seed is not None:
        torch.manual_seed(seed)
    tokens = backbone.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                               batch["pixel_values"].to(device), max_new_tokens=sampling.max_new_tokens,
                               do_sample=sampling.do_sample, temperature=sampling.temperature,
                               top_p=sampling.top_p, top_k=sampling.top_k)
    return backbone.decode(tokens.cpu())


def batched(items: Iterable, n: int) -> Iterator[list]:
    """Lists of ``n`` consecutive items (the last may be shorter)."""
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def generate_views(backbone: Backbone, samples: Iterable[tuple[Record, list]], views: dict[str, View],
                   encode: Encode, batch_size: int = 32, seed: int = 0, skipped: Optional[Counter] = None,
                   progress: bool = True, total: Optional[int] = None,
                   desc: str = "generating") -> Iterator[tuple[Record, list, dict[str, str]]]:
    """``(record, images, {view name: answer})`` for every sample, ``batch_size`` prompts per forward.

    A sample that cannot be encoded (e.g. ``too_long``) is counted in ``skipped`` (raised without it). The
    progress bar counts samples read. Sampled views reseed from ``seed`` and the batch number.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True)
    try:
        for b, chunk in enumerate(batched(samples, batch_size)):
            kept, per_view = [], {name: [] for name in views}
            for record, images in chunk:
                try:
                    examples = {name: encode_view(encode, record, images, v) for name, v in views.items()}
                except SampleError as e:
                    if skipped is None:
                        raise
                    skipped[e.reason] += 1
                    continue
                kept.append((record, images))
                for name, ex in examples.items():
                    per_view[name].append(ex)
            texts = {name: generate(backbone, per_view[name], v.sampling, record_seed(seed, str(b), name))
                     for name, v in views.items()}
            for i, (record, images) in enumerate(kept):
                yield record, images, {name: texts[name][i] for name in views}
            bar.update(len(chunk))
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------ scripts
def add_runtime_args(parser, dtype: bool = True, summary: bool = False):
    """Add the options the model-running scripts of ``data_prep/`` and ``eval/`` share: ``--dtype`` (weights),
    ``--device``, ``--no-progress`` and, with ``summary``, ``--summary`` (a path for the run's summary JSON)."""
    if dtype:
        parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the model weights")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    if summary:
        parser.add_argument("--summary", default=None, help="also write the summary JSON here")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def report(summary: dict, path: Optional[str] = None, stream=None) -> dict:
    """Print ``summary`` as indented JSON to ``stream`` (default stderr, so stdout stays for data) and, when
    ``path`` is given, write it there too. Returns ``summary``."""
    print(json.dumps(summary, indent=1), file=stream or sys.stderr)
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)
    return summary
