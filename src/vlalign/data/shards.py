"""Reading, writing and safely decoding WebDataset tar shards that follow ``vlalign.data.schema``.

Write (from ``data_prep/``)::

    with ShardWriter("data/shapes/train-%06d.tar", max_count=1000) as w:
        w.write(record, [pil_image])          # record: a schema dataclass or a plain dict

Read, in two stages that never raise for bad data but name it::

    for item in iter_shard("data/shapes/train-000000.tar"):   # raw samples, in shard order
        if isinstance(item, SampleError):                      # a bad sample or a damaged shard
            skipped[item.reason] += 1                          # item.shard, item.key say where
            continue
        record, images = decode_sample(item, max_pixels=DEFAULT_MAX_PIXELS)   # raises SampleError

``iter_shard`` is the project's own tar reader (no webdataset): it groups members into samples as webdataset does
(key = the member path up to the first dot of its base name), and detects what a plain tar reader takes for the
end of the shard: a file that ends early, a damaged header (it resynchronises on the next valid header, so later
samples still arrive), non-zero data after the end-of-archive marker, duplicate members. ``decode_sample`` looks only
at ``json`` and the image extensions of the allow-list; other members are never decoded (webdataset's own
``decode("pil")`` would unpickle ``.pyd`` / ``.pickle`` members, which lets a downloaded shard run code). Images are
bounded by a pixel count read from their header before any pixel is decoded.
"""

from __future__ import annotations

import glob
import io
import json
import os
import stat
import tarfile
import warnings
from typing import Iterable, Iterator, Sequence

from PIL import Image

from .schema import IMAGE_EXTENSIONS, Record, RecordError, check_json_value, loads_record, parse_record

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest image (width x height, 16.8 M pixels) ``decode_sample`` decodes by default.

Checked from the image header before decoding, so an image above it costs milliseconds and no pixel memory.
At the limit an RGB image holds 48 MiB decoded; LLaVA resizes every image to 336-672 px a side, so larger
inputs only cost time and memory. Photo datasets (COCO, Visual Genome, SAM: at most ~12 M pixels) pass; raise it
(``ShardDataModule(max_image_pixels=...)``) for camera originals (24 M pixels). PIL's own global bound
(``Image.MAX_IMAGE_PIXELS``, 89.5 M pixels) still applies above it.
"""

MAX_MEMBER_BYTES = 1 << 30
"""Largest tar member, and largest sample (all members together), ``iter_shard`` reads into memory (1 GiB);
a bigger one is skipped unread and reported as a bad sample (``member_too_large``)."""

_MAX_EXTENDED_HEADER = 1 << 20  # a pax / GNU long-name header is a few hundred bytes; more means damage
_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")  # the decoders behind IMAGE_EXTENSIONS; no other PIL plugin is ever run


class SampleError(ValueError):
    """A sample (or a whole shard) that cannot be used.

    Args:
        reason: a short tag for counting, e.g. ``"bad_image"``, ``"image_too_large"``, ``"duplicate_member"``,
            ``"bad_json"``, ``"non_finite"``, ``"bad_record"``, ``"identical_pair"``, ``"shard_truncated"``,
            ``"shard_corrupt"``, ``"shard_unreadable"``, ``"too_long"``.
        message: what is wrong, without the location.
        shard, key: where (``None`` while unknown, or for a fault of the whole shard); ``str(e)`` starts with them:
            ``"shard S key K: message"``.
    """

    def __init__(self, reason: str, message: str, shard: str | None = None, key: str | None = None):
        super().__init__(message)
        self.reason, self.message, self.shard, self.key = reason, message, shard, key

    def at(self, shard: str | None, key: str | None) -> "SampleError":
        """Fill in ``shard`` and ``key`` where still unknown; returns ``self`` (``raise e.at(url, key)``)."""
        if self.shard is None:
            self.shard = shard
        if self.key is None:
            self.key = key
        return self

    def __str__(self) -> str:
        where = " ".join(f"{k} {v}" for k, v in (("shard", self.shard), ("key", self.key)) if v is not None)
        return f"{where}: {self.message}" if where else self.message

    def __reduce__(self):  # survives pickling (DataLoader workers) with every field
        return type(self), (self.reason, self.message, self.shard, self.key)


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
        check_json_value(obj)  # refuse to write what the reader would reject
        parse_record(obj)
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


def _decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """One image member -> an RGB image (the first frame of an animation); raises ``SampleError``.

    The size comes from the header (``Image.open`` is lazy) and is checked before ``load()`` decodes a pixel.
    PIL's decompression-bomb warning is an error here only (``catch_warnings`` restores the filters after).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise SampleError("image_too_large", f"image {name} is {width}x{height} = {width * height} "
                                      f"pixels, over the limit of {max_pixels} (max_image_pixels)")
                im.load()  # frame 0 only: an animated PNG / WebP gives its first frame
                return im.convert("RGB")
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SampleError("image_too_large", f"image {name}: {e}") from e
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, struct.error, ... on bad input
        raise SampleError("bad_image", f"image {name} cannot be decoded ({type(e).__name__}: {e})") from e


def decode_sample(sample: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Record, list[Image.Image]]:
    """Decode one raw sample (from ``iter_shard``) into ``(record, RGB images)``; raises ``SampleError``.

    Only the ``json`` member and image members on the allow-list are read; nothing is unpickled. The text is
    validated by ``schema.loads_record`` (reasons ``bad_json``, ``non_finite``, ``bad_record``, ``identical_pair``);
    an image over ``max_pixels`` (width x height) is refused from its header (``image_too_large``), an undecodable
    one is ``bad_image``. The error carries the sample's shard and key.
    """
    try:
        if "json" not in sample:
            raise SampleError("no_json", "no .json record")
        try:
            record = loads_record(sample["json"])
        except RecordError as e:
            raise SampleError(e.reason, str(e)) from e
        images = [_decode_image(sample[k], k, max_pixels) for k in _image_keys(sample)]
    except SampleError as e:
        raise e.at(sample.get("__url__"), sample.get("__key__"))
    return record, images


# ------------------------------------------------------------------------------------------------ tar reading
def _split_name(name: str) -> tuple[str | None, str | None]:
    """``"dir/abc.0.png"`` -> ``("dir/abc", "0.png")`` as webdataset groups members; ``(None, None)`` for a name
    without an extension (not part of any sample). Extensions are lower-cased; ``__x__`` ones are refused, as they
    would overwrite the sample's own ``__key__`` / ``__url__``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    if not stem or not ext or ext.startswith("__"):
        return None, None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _pax_fields(data: bytes) -> dict[str, str]:
    """The records of a pax extended header (``"LEN key=value\n"`` each); raises ``ValueError`` if malformed."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        record = data[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise ValueError(f"malformed pax record at {pos}")
        k, _, v = record[:-1].partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
    return out


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_NO_DATA = (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)
_EXTENDED = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)


def _tar_events(f, total: int) -> Iterator[tuple]:
    """Walk a tar file block by block; the events ``iter_shard`` groups into samples:

    ``("member", name, data, offset, bad)``  a regular file; ``bad`` is ``(reason, message)`` when its data was
                                             not read (too large, unsupported), else ``None``
    ``("end",)``                             the end-of-archive marker: every sample so far is complete
    ``("corrupt", offset, message)``         a header that is not one (bad checksum, nonsense fields) or non-zero
                                             data after the end marker; the walk then scans forward block by
                                             block for the next header with a valid checksum and goes on there
    ``("truncated", message, name)``         the file ends early (inside member ``name``, or between members when
                                             ``name`` is None); always the last event

    Headers are parsed with ``tarfile.TarInfo.frombuf`` (ustar, GNU, v7 and pax, as Python's tarfile and GNU tar
    write them); pax ``path``/``size`` and GNU long names apply to the next header; pax global headers are
    ignored. Nothing is ever written to disk, so names such as ``../x`` or ``/etc/x`` are only names.
    """
    pos, scanning, pax, longname = 0, False, {}, None
    while True:
        f.seek(pos)
        buf = f.read(_BLOCK)
        if scanning:
            if len(buf) < _BLOCK:
                return
            if buf == _ZERO_BLOCK:
                pos += _BLOCK
                continue
        elif len(buf) < _BLOCK:
            what = "inside a tar header" if buf else "without the end-of-archive marker"
            yield "truncated", f"the file ends at byte {pos + len(buf)} {what}", None
            return
        elif buf == _ZERO_BLOCK:
            yield ("end",)
            rest, nonzero = pos + _BLOCK, None
            while nonzero is None:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                stripped = chunk.lstrip(b"\0")
                if stripped:
                    nonzero = rest + len(chunk) - len(stripped)
                rest += len(chunk)
            if nonzero is None:
                if total - pos < 2 * _BLOCK:
                    yield "truncated", f"the file ends at byte {total} inside the end-of-archive marker", None
                return
            pos = nonzero // _BLOCK * _BLOCK
            yield "corrupt", pos, f"non-zero data at byte {nonzero} after the end-of-archive marker"
            scanning, pax, longname = True, {}, None
            continue
        try:
            info = tarfile.TarInfo.frombuf(buf, "utf-8", "replace")
            size = info.size if info.type in _EXTENDED else int(pax.get("size", info.size))
            if size < 0:
                raise tarfile.HeaderError(f"negative size {size}")
        except (tarfile.HeaderError, ValueError) as e:
            if not scanning:
                yield "corrupt", pos, f"bad tar header at byte {pos} ({e})"
                scanning, pax, longname = True, {}, None
            pos += _BLOCK
            continue
        scanning = False
        start, end = pos + _BLOCK, pos + _BLOCK + _padded(size)
        name = pax.get("GNU.sparse.name") or pax.get("path") or longname or info.name
        if info.type in _EXTENDED:
            if size > _MAX_EXTENDED_HEADER:
                yield "corrupt", pos, f"bad tar header at byte {pos} (an extended header of {size} bytes)"
                scanning, pax, longname, pos = True, {}, None, start
                continue
            data = f.read(size)
            if len(data) < size:
                yield "truncated", f"the file ends at byte {total} inside an extended tar header", None
                return
            if info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                try:
                    pax = {**pax, **_pax_fields(data)}
                except ValueError as e:
                    yield "corrupt", pos, f"bad pax header at byte {pos} ({e})"
                    scanning, pax, longname, pos = True, {}, None, start
                    continue
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                longname = tarfile.nts(data, "utf-8", "replace")
            pos = end
            continue
        sparse = info.type == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse.") for k in pax)
        pax, longname = {}, None
        if info.type in _NO_DATA:
            pos = start
            continue
        if sparse and info.type == tarfile.GNUTYPE_SPARSE:
            extended = buf[482]
            while extended:  # GNU sparse maps continue in extra header blocks before the data
                more = f.read(_BLOCK)
                if len(more) < _BLOCK:
                    yield "truncated", f"the file ends at byte {total} inside a sparse header", name
                    return
                start, end, extended = start + _BLOCK, end + _BLOCK, more[504]
        if start + size > total:
            yield "truncated", f"the file ends at byte {total} inside member {name!r} ({size} bytes from {start})", name
            return
        if sparse:  # GNU sparse (old or pax layout): the stored bytes are not the file's bytes
            yield "member", name, None, pos, ("unsupported_member", f"member {name!r} is a sparse file")
        if sparse or info.type not in _REGULAR:
            pos = end  # an unknown member type: skip its data, as tarfile does
            continue
        if size > MAX_MEMBER_BYTES:
            yield "member", name, None, pos, ("member_too_large", f"member {name!r} has {size} bytes "
                                              f"(at most {MAX_MEMBER_BYTES} are read)")
        else:
            f.seek(start)
            data = f.read(size)
            if len(data) < size:  # the file shrank while being read
                yield "truncated", f"the file ends at byte {start + len(data)} inside member {name!r}", name
                return
            yield "member", name, data, pos, None
        if end > total:
            yield "truncated", f"the file ends at byte {total} inside the padding of member {name!r}", None
            return
        pos = end


def _open_fault(url: str) -> str | None:
    """Why ``url`` cannot be read as a shard (missing, dangling link, directory, not a file, empty), or None."""
    try:
        st = os.stat(url)
    except FileNotFoundError:
        if os.path.islink(url):
            return f"dangling symbolic link to {os.readlink(url)!r}"
        return "no such file"
    except OSError as e:
        return f"cannot stat: {e.strerror or e}"
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a tar file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"  # a FIFO would block the reader forever
    if st.st_size == 0:
        return "an empty file (0 bytes)"
    return None


_DROP = object()  # the rest of a sample already reported: nothing more to yield for it


def iter_shard(url: str) -> Iterator[dict | SampleError]:
    """The samples of one local tar shard (a path; no remote URLs) in shard order: raw samples and, in their place,
    ``SampleError``s.

    A raw sample is ``{"__key__": key, "__url__": url, "<ext>": bytes, ...}`` with one entry per member (key = member
    path up to the first dot of its base name, ext = the rest, lower-cased; consecutive members with one key form a
    sample, and a key that comes back later starts a new sample, as in webdataset). Never raises for bad data;
    yields a ``SampleError`` (shard ``url``, key when known), each bad sample once, instead of:

    - ``shard_unreadable``: missing file, dangling link, directory, no permission, empty (0 bytes), read error.
    - ``shard_truncated``: the file ends inside a member (that sample), or without the end-of-archive marker
      (the last sample, which may have lost members, or key None when no sample is open).
    - ``shard_corrupt``: a damaged header. Neither the sample just before it nor the first one after the next valid
      header can be shown complete, so both are reported (one error when they share a key, a key-None error when
      there is neither); every other sample is delivered. Also non-zero data after the end-of-archive marker.
    - ``duplicate_member``: two members with the same key and extension in one sample.
    - ``member_too_large`` / ``unsupported_member``: a member over ``MAX_MEMBER_BYTES`` (or a sample over it
      in all), or a sparse file; its data is skipped unread.
    """
    fault = _open_fault(url)
    if fault is None:
        try:
            f = open(url, "rb")
            total = os.fstat(f.fileno()).st_size
        except OSError as e:
            fault = f"cannot open: {e.strerror or e}"
    if fault is not None:
        yield SampleError("shard_unreadable", fault, url)
        return
    sample, error, nbytes = None, None, 0
    doubt = None  # (damage, key reported before it): the first sample after a resynchronisation is in doubt
    with f:
        try:
            for event in _tar_events(f, total):
                if event[0] == "member":
                    _, name, data, offset, bad = event
                    key, ext = _split_name(name)
                    if key is None:
                        continue
                    if sample is not None and sample["__key__"] != key:
                        if error is not _DROP:
                            yield error or sample
                        sample = error = None
                    if sample is None:
                        sample, nbytes = {"__key__": key, "__url__": url}, 0
                        if doubt is not None:
                            damage, before = doubt
                            error = _DROP if key == before else SampleError(
                                "shard_corrupt", f"{damage}: this sample, the first after it, may be incomplete",
                                url, key)
                            doubt = None
                    if error is not None:
                        continue
                    nbytes += len(data or b"")
                    if bad is not None:
                        error = SampleError(*bad, url, key)
                    elif ext in sample:
                        error = SampleError("duplicate_member", f"member {name!r} (at byte {offset}) appears twice "
                                            "in one sample", url, key)
                    elif nbytes > MAX_MEMBER_BYTES:
                        error = SampleError("member_too_large", f"the sample's members exceed {MAX_MEMBER_BYTES} "
                                            "bytes together", url, key)
                    else:
                        sample[ext] = data
                elif event[0] == "end":
                    if sample is not None and error is not _DROP:
                        yield error or sample
                    sample = error = None
                elif event[0] == "corrupt":
                    _, offset, message = event
                    if sample is not None:
                        if error is not _DROP:
                            yield error or SampleError("shard_corrupt", f"{message}: this sample, just before it, "
                                                       "may be incomplete", url, sample["__key__"])
                        doubt = (message, sample["__key__"])
                        sample = error = None
                    elif doubt is None:
                        doubt = (message, None)
                else:  # truncated: the last event
                    _, message, name = event
                    cut = _split_name(name)[0] if name else None
                    if sample is not None and cut is not None and cut != sample["__key__"]:
                        if error is not _DROP:
                            yield error or sample  # complete: the next sample had begun
                        sample = error = None
                    if sample is not None:
                        if error is not _DROP:
                            yield error or SampleError("shard_truncated", message, url, sample["__key__"])
                        sample = error = None
                    else:
                        yield SampleError("shard_truncated", message, url, cut)
        except OSError as e:  # a read error (EIO, a file on a vanished mount): the open sample is lost
            key = sample["__key__"] if sample is not None else None
            if sample is None or error is not _DROP:
                yield error or SampleError("shard_unreadable", f"read error: {e.strerror or e}", url, key)
            sample = error = None
    if sample is not None and error is not _DROP:  # the walk ended while scanning for a header after damage
        yield error or sample
    if doubt is not None and doubt[1] is None:  # damage with no sample on either side: still report it once
        yield SampleError("shard_corrupt", doubt[0], url)


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



def read_shard(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterable[tuple[Record, list[Image.Image]]]:
    """Iterate over the decoded samples of one local shard, for tools and tests; raises the first
    ``SampleError`` (a bad sample or a damaged shard)."""
    for raw in iter_shard(path):
        if isinstance(raw, SampleError):
            raise raw
        yield decode_sample(raw, max_pixels=max_pixels)
