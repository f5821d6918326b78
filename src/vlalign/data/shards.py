"""Writing and safely decoding WebDataset tar shards that follow ``vlalign.data.schema``.

Write (from ``data_prep/``)::

    with ShardWriter("data/shapes/train-%06d.tar", max_count=1000) as w:
        w.write(record, [pil_image])          # record: a schema dataclass or a plain dict

Read: ``webdataset`` yields raw samples (``{"__key__", "__url__", "json": bytes, "png": bytes, ...}``) and
``decode_sample`` turns one into ``(record, images)``. It looks only at ``json`` and the image extensions of the
allow-list; other members are never decoded (webdataset's own ``decode("pil")`` would unpickle ``.pyd`` /
``.pickle`` members, which lets a downloaded shard run code).
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from .schema import IMAGE_EXTENSIONS, Record, RecordError, loads_record, parse_record


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is a short tag for counting, the message names shard and key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _image_bytes(image: Image.Image | bytes, fmt: str) -> bytes:
    if isinstance(image, bytes):
        return image
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format=fmt.upper())
    return buf.getvalue()


class ShardWriter:
    """Write records (and their images) into numbered tar shards of at most ``max_count`` samples.

    Args:
        pattern: a path with one ``%d``-style field for the shard number, e.g. ``"out/train-%06d.tar"``.
        max_count: samples per shard.
        image_format: ``"png"`` (lossless, default) or ``"jpg"``.
    """

    def __init__(self, pattern: str, max_count: int = 1000, image_format: str = "png"):
        if "%" not in pattern:
            raise ValueError(f"pattern needs a %d field for the shard number, got {pattern!r}")
        if image_format not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_format must be one of {IMAGE_EXTENSIONS}")
        self.pattern, self.max_count, self.image_format = pattern, max_count, image_format
        self.shard, self.count, self.total, self._tar = -1, 0, 0, None
        self.paths: list[str] = []
        os.makedirs(os.path.dirname(pattern) or ".", exist_ok=True)

    def _next(self):
        self.close()
        self.shard += 1
        path = self.pattern % self.shard
        self._tmp = path + ".tmp"
        self._tar = tarfile.open(self._tmp, "w")
        self.paths.append(path)
        self.count = 0

    def _add(self, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, record: Record | dict, images: Sequence[Image.Image | bytes] = (), key: str | None = None,
              image_format: str | None = None):
        """Add one sample. The record is validated first; ``key`` defaults to a running number.

        ``image_format`` overrides the writer's format for this sample: the extension raw image bytes are stored
        under (they are written as given), or the encoding of PIL images.
        """
        fmt = image_format or self.image_format
        if fmt not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_format must be one of {IMAGE_EXTENSIONS}, got {fmt!r}")
        obj = record if isinstance(record, dict) else record.to_json()
        parse_record(obj)  # refuse to write what the reader would reject
        if self._tar is None or self.count >= self.max_count:
            self._next()
        key = key or f"{self.total:09d}"
        if "." in key or "/" in key:
            raise ValueError(f"a key may not contain '.' or '/': {key!r}")
        self._add(f"{key}.json", json.dumps(obj, ensure_ascii=False).encode())
        if len(images) == 1:
            self._add(f"{key}.{fmt}", _image_bytes(images[0], fmt))
        else:
            for i, im in enumerate(images):
                self._add(f"{key}.{i}.{fmt}", _image_bytes(im, fmt))
        self.count += 1
        self.total += 1

    def close(self):
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self.paths[-1])  # a shard appears only once complete
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _image_keys(sample: dict) -> list[str]:
    """Image member names of a raw sample in order: ``png`` alone, or ``0.png``, ``1.jpg``, ..."""
    single = [k for k in sample if k.lower() in IMAGE_EXTENSIONS]
    numbered = []
    for k in sample:
        head, _, ext = k.partition(".")
        if head.isdigit() and ext.lower() in IMAGE_EXTENSIONS:
            numbered.append((int(head), k))
    if single and numbered:
        raise SampleError("bad_layout", "both a single image and numbered images")
    return single[:1] if single else [k for _, k in sorted(numbered)]


def image_members(sample: dict) -> list[tuple[str, bytes]]:
    """A raw sample's image members as ``(extension, bytes)``, undecoded, in the order ``decode_sample`` reads
    them: for tools that copy images from one shard into another unchanged. Raises ``SampleError``."""
    return [(k.partition(".")[2].lower() if "." in k else k.lower(), sample[k]) for k in _image_keys(sample)]


def decode_sample(sample: dict) -> tuple[Record, list[Image.Image]]:
    """Decode one raw webdataset sample into ``(record, RGB images)``; raises ``SampleError``.

    Only the ``json`` member and image members on the allow-list are read; nothing is unpickled.
    """
    where = f"shard {sample.get('__url__', '?')} key {sample.get('__key__', '?')}"
    if "json" not in sample:
        raise SampleError("no_json", f"{where}: no .json record")
    try:
        record = loads_record(sample["json"])
    except RecordError as e:
        raise SampleError("bad_record", f"{where}: {e}") from e
    try:
        keys = _image_keys(sample)
    except SampleError as e:
        raise SampleError(e.reason, f"{where}: {e}") from e
    images = []
    for k in keys:
        try:
            im = Image.open(io.BytesIO(sample[k]))
            im.load()
            images.append(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise SampleError("bad_image", f"{where}: image {k} cannot be decoded ({e})") from e
    return record, images


def expand_urls(urls: str | Iterable[str]) -> list[str]:
    """Shard locations from a glob, a brace pattern (``train-{000000..000009}.tar``), a directory, or a list."""
    import braceexpand

    if isinstance(urls, str):
        urls = [urls]
    out: list[str] = []
    for u in urls:
        for e in braceexpand.braceexpand(u):
            if os.path.isdir(e):
                out += sorted(glob.glob(os.path.join(e, "*.tar")))
            elif any(c in e for c in "*?["):
                out += sorted(glob.glob(e))
            else:
                out.append(e)
    return out


@dataclass
class _Local:
    """Reads a local shard's members without webdataset, for tools and tests (same decoding rules)."""

    path: str

    def __iter__(self):
        with tarfile.open(self.path) as tar:
            cur: dict = {}
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                if cur and cur["__key__"] != key:
                    yield cur
                    cur = {}
                if not cur:
                    cur = {"__key__": key, "__url__": self.path}
                cur[ext] = tar.extractfile(m).read()
            if cur:
                yield cur


def read_shard(path: str) -> Iterable[tuple[Record, list[Image.Image]]]:
    """Iterate over the decoded samples of one local shard (raises ``SampleError`` on a bad one)."""
    for raw in _Local(path):
        yield decode_sample(raw)
