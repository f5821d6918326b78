"""A corpus of bad shards, built in ``tmp_path``: every good sample is delivered and every fault is reported once.

Good samples are written with ``ShardWriter``; the faults are made by byte surgery on real tar files (or by
writing tar members by hand). For each shard the test reads it with ``iter_shard`` + ``decode_sample`` and checks
the exact sequence of outcomes: the key of every good sample and ``(reason, key)`` of every ``SampleError``, whose
``shard`` must be the file read.
"""

import io
import json
import os
import pickle
import struct
import subprocess
import tarfile
import time
import warnings
import zlib
from collections import Counter

import pytest
from PIL import Image
from raw_tar import write_tar

from vlalign.data.schema import MAX_JSON_DEPTH, RecordError, loads_record
from vlalign.data.shards import (DEFAULT_MAX_PIXELS, MAX_MEMBER_BYTES, SampleError, ShardWriter, decode_sample,
                                 iter_shard)


# ------------------------------------------------------------------------------------------ building the corpus
def _sft(key: str) -> dict:
    return {"kind": "sft", "id": key, "conversation": [{"role": "user", "content": "<image>\nWhat is it?"},
                                                       {"role": "assistant", "content": f"Shape {key}."}]}


def _pref(key: str, **extra) -> dict:
    return {"kind": "preference", "id": key, "prompt": "<image>\nDescribe it.", "chosen": "A red circle.",
            "rejected": "A blue star.", **extra}


def _png_bytes(colour="red", size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _blank_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid grayscale PNG of ``width x height`` zero pixels, its rows streamed through zlib: 12000 x 12000 is
    ~140 KB on disk and 144 M pixels decoded. ``rows`` keeps only that many rows of data (the header still says
    ``height``): enough for a reader that must refuse it from the header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), bytes(width + 1)
    idat = b"".join(z.compress(row) for _ in range(height if rows is None else rows)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _write(path, samples) -> str:
    """A good shard of ``(key, record)`` samples, one PNG each (``ShardWriter``: json first, then png)."""
    with ShardWriter(str(path) + "-%d", max_count=10 ** 6) as w:
        for key, record in samples:
            w.write(record, [_png_bytes()], key=key)
    os.replace(w.paths[0], path)
    return str(path)


def _members(samples):
    return [m for key, record in samples
            for m in ((f"{key}.json", json.dumps(record).encode()), (f"{key}.png", _png_bytes()))]


def _offsets(path) -> dict[str, int]:
    """Byte offset of each member's header."""
    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


def _good(keys):
    return [(k, _sft(k)) for k in keys]


class _Boom:
    """Unpickling this creates the file ``path``: the canary of a reader that unpickles shard members."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def build_corpus(root) -> dict[str, tuple[str, list]]:
    """Bad shards under ``root``: name -> (path, expected outcomes of ``_outcomes``, in shard order).

    An outcome is a key (a good sample) or ``(reason, key)`` (a ``SampleError`` from ``iter_shard`` or
    ``decode_sample``; key None for a fault of the whole shard).
    """
    root = str(root)
    corpus: dict[str, tuple[str, list]] = {}

    def good_shard(name, keys):
        return _write(os.path.join(root, name + ".tar"), _good(keys))

    # images: PIL's bomb limit, the project's pixel limit, not an image at all
    bomb = _blank_png(20000, 20000, rows=4)  # 400 M pixels in the header: PIL's DecompressionBombError
    members = _members(_good(["a0"])) + [("bomb.json", json.dumps(_sft("bomb")).encode()), ("bomb.png", bomb)]
    members += [("huge.json", json.dumps(_sft("huge")).encode()), ("huge.png", _blank_png(5000, 5000, rows=4))]
    members += [("junk.json", json.dumps(_sft("junk")).encode()), ("junk.png", b"\x89PNG not really")]
    members += _members(_good(["a1"]))
    corpus["images"] = (write_tar(os.path.join(root, "images.tar"), members),
                        ["a0", ("image_too_large", "bomb"), ("image_too_large", "huge"), ("bad_image", "junk"), "a1"])

    # truncation: inside a member, right after the last member, inside the end-of-archive marker
    path = good_shard("cut-member", ["t0", "t1", "t2", "t3"])
    with open(path, "r+b") as f:
        f.truncate(_offsets(path)["t2.png"] + 512 + 10)
    corpus["truncated_in_member"] = (path, ["t0", "t1", ("shard_truncated", "t2")])
    path = good_shard("cut-end", ["e0", "e1", "e2"])
    with tarfile.open(path) as tar:
        last = tar.getmember("e2.png")
    with open(path, "r+b") as f:
        f.truncate(last.offset_data + -(-last.size // 512) * 512)
    corpus["no_end_marker"] = (path, ["e0", "e1", ("shard_truncated", "e2")])  # e2 could have had more members
    path = good_shard("cut-marker", ["m0", "m1"])
    end = _end_of_members(path)
    with open(path, "r+b") as f:
        f.truncate(end + 512)  # one of the two zero blocks
    corpus["half_end_marker"] = (path, ["m0", "m1", ("shard_truncated", None)])

    # a damaged header mid-shard: the neighbours that may have lost a member are reported, the rest delivered
    path = good_shard("corrupt", ["c0", "c1", "c2", "c3", "c4"])
    _damage(path, _offsets(path)["c2.json"])
    corpus["corrupt_header"] = (path, ["c0", ("shard_corrupt", "c1"), ("shard_corrupt", "c2"), "c3", "c4"])
    path = good_shard("corrupt-inside", ["d0", "d1", "d2", "d3"])
    _damage(path, _offsets(path)["d1.png"])  # d1 lost its png; d2, the first after it, could have lost a member
    corpus["corrupt_member_header"] = (path, ["d0", ("shard_corrupt", "d1"), ("shard_corrupt", "d2"), "d3"])
    path = good_shard("corrupt-first", ["f0", "f1", "f2"])
    _damage(path, 0)
    corpus["corrupt_first_header"] = (path, [("shard_corrupt", "f0"), "f1", "f2"])
    path = good_shard("trailing", ["g0", "g1"])
    with open(path, "ab") as f:
        f.write(b"garbage after the end of the archive")
    corpus["trailing_garbage"] = (path, ["g0", "g1", ("shard_corrupt", None)])
    path = good_shard("garbage-in-padding", ["h0"])
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)
        f.write(b"\x01")
    corpus["garbage_in_padding"] = (path, ["h0", ("shard_corrupt", None)])

    # shards that cannot be read at all
    empty = os.path.join(root, "empty.tar")
    open(empty, "wb").close()
    corpus["empty"] = (empty, [("shard_unreadable", None)])
    folder = os.path.join(root, "folder.tar")
    os.mkdir(folder)
    corpus["directory"] = (folder, [("shard_unreadable", None)])
    link = os.path.join(root, "dangling.tar")
    os.symlink(os.path.join(root, "gone.tar"), link)
    corpus["dangling_symlink"] = (link, [("shard_unreadable", None)])
    corpus["missing"] = (os.path.join(root, "missing.tar"), [("shard_unreadable", None)])

    # samples that break the grouping rules
    members = _members(_good(["u0", "u1"]))
    members.insert(2, ("u0.png", _png_bytes("blue")))  # u0.json, u0.png, u0.png
    members += _members(_good(["u0"]))  # u0 again, later and not adjacent: a new sample
    corpus["duplicate_member"] = (write_tar(os.path.join(root, "dup.tar"), members),
                                  [("duplicate_member", "u0"), "u1", "u0"])

    # text
    surrogate = json.dumps(_sft("sur")).replace("Shape sur.", "\\ud800 lone").encode()
    assert b"\\ud800" in surrogate
    deep = json.dumps(_sft("deep") | {"meta": {"x": "DEEP"}}).replace('"DEEP"', "[" * 5000 + "]" * 5000).encode()
    nan = json.dumps(_pref("nan", ref_logps={"model": "m", "chosen": {"sum": float("nan"), "mean": -1, "tokens": 3},
                                             "rejected": {"sum": -8.0, "mean": -2, "tokens": 4}})).encode()
    assert b"NaN" in nan
    inf = json.dumps(_pref("inf")).replace('"id"', '"score": 1e999, "id"').encode()
    same = json.dumps(_pref("same", rejected=" A red circle.\n")).encode()
    dup_cands = json.dumps(_pref("cands", candidates=["a", "b", "a"])).encode()
    latin1 = json.dumps(_sft("latin")).replace("What", "W\u00e4s").encode("latin-1")
    members = _members(_good(["x0"]))
    for key, data in [("sur", surrogate), ("deep", deep), ("nan", nan), ("inf", inf), ("same", same),
                      ("cands", dup_cands), ("latin", latin1)]:
        members += [(f"{key}.json", data), (f"{key}.png", _png_bytes())]
    members += _members(_good(["x1"]))
    corpus["text"] = (write_tar(os.path.join(root, "text.tar"), members),
                      ["x0", ("bad_json", "sur"), ("bad_json", "deep"), ("non_finite", "nan"), ("non_finite", "inf"),
                       ("identical_pair", "same"), ("identical_pair", "cands"), ("bad_json", "latin"), "x1"])

    # pickles are never unpickled; the samples around them are delivered
    evil = pickle.dumps(_Boom(os.path.join(root, "pwned")))
    members = _members(_good(["p0"])) + [("p0.pyd", evil), ("p0.pickle", evil)]
    members += [("p1.pickle", evil)] + _members(_good(["p1"]))[:1] + [("p1.png", _png_bytes())]
    corpus["pickles"] = (write_tar(os.path.join(root, "pickles.tar"), members), ["p0", "p1"])

    # names a careless reader would write to: only names here (and never written anywhere)
    members = [("../up.json", json.dumps(_sft("up")).encode()), ("../up.png", _png_bytes()),
               ("/abs/olute.json", json.dumps(_sft("abs")).encode()), ("/abs/olute.png", _png_bytes()),
               ("dir/" + "n" * 150 + ".json", json.dumps(_sft("long")).encode()), ("dir/" + "n" * 150 + ".png",
                                                                                 _png_bytes()),
               ("README", b"no extension: not part of any sample"), ("x.__key__", b"cannot overwrite the key")]
    corpus["names_pax"] = (write_tar(os.path.join(root, "names-pax.tar"), members),
                           ["../up", "/abs/olute", "dir/" + "n" * 150])
    corpus["names_gnu"] = (write_tar(os.path.join(root, "names-gnu.tar"), members, fmt=tarfile.GNU_FORMAT),
                           ["../up", "/abs/olute", "dir/" + "n" * 150])
    return corpus


def _end_of_members(path) -> int:
    """Byte offset just past the last member's data: where the end-of-archive marker starts."""
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def _damage(path, offset: int):
    """Overwrite the tar header at ``offset`` with garbage (its checksum no longer matches)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xa5GARBAGE" * 32)


def _outcomes(path, max_pixels=DEFAULT_MAX_PIXELS) -> list:
    """What reading ``path`` delivers: a key per good sample, ``(reason, key)`` per error (shard checked)."""
    out = []
    for item in iter_shard(str(path)):
        if not isinstance(item, SampleError):
            try:
                record, images = decode_sample(item, max_pixels=max_pixels)
            except SampleError as e:
                item = e
            else:
                assert len(images) == 1 and images[0].mode == "RGB"
                out.append(item["__key__"])
                continue
        assert item.shard == str(path), item
        out.append((item.reason, item.key))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("bad_shards"))


CASES = ["images", "truncated_in_member", "no_end_marker", "half_end_marker", "corrupt_header",
         "corrupt_member_header", "corrupt_first_header", "trailing_garbage", "garbage_in_padding", "empty",
         "directory", "dangling_symlink", "missing", "duplicate_member", "text", "pickles", "names_pax", "names_gnu"]


@pytest.mark.parametrize("case", CASES)
def test_bad_shard_delivers_every_good_sample_and_reports_each_fault(corpus, case):
    path, expected = corpus[case]
    assert _outcomes(path) == expected


def test_corpus_has_every_case(corpus):
    assert sorted(corpus) == sorted(CASES)


def test_pickles_are_never_unpickled(corpus, tmp_path):
    path, _ = corpus["pickles"]
    raw = [s for s in iter_shard(path)]
    assert sorted(raw[0]) == ["__key__", "__url__", "json", "pickle", "png", "pyd"]  # carried as bytes, unread
    for s in raw:
        decode_sample(s)
    assert not os.path.exists(os.path.join(os.path.dirname(path), "pwned"))


def test_unreadable_shard(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads a file without permission bits")
    path = _write(tmp_path / "locked.tar", _good(["l0"]))
    os.chmod(path, 0)
    try:
        items = list(iter_shard(path))
    finally:
        os.chmod(path, 0o644)
    assert [(e.reason, e.key, e.shard) for e in items] == [("shard_unreadable", None, path)]
    assert "ermission" in str(items[0])


def test_errors_name_shard_and_key(corpus):
    path, _ = corpus["truncated_in_member"]
    error = list(iter_shard(path))[-1]
    assert str(error).startswith(f"shard {path} key t2: the file ends at byte")
    path, _ = corpus["corrupt_header"]
    errors = [e for e in iter_shard(path) if isinstance(e, SampleError)]
    assert "bad tar header at byte 4096" in str(errors[0]) and "just before it" in str(errors[0])
    path, _ = corpus["dangling_symlink"]
    assert "dangling symbolic link" in str(next(iter_shard(path)))
    e = pickle.loads(pickle.dumps(SampleError("bad_image", "m", "s", "k")))  # crosses DataLoader worker pipes
    assert (e.reason, e.shard, e.key, str(e)) == ("bad_image", "s", "k", "shard s key k: m")
    assert SampleError("r", "m").at("s", None).at("t", "k").__str__() == "shard s key k: m"


def test_shard_written_by_gnu_tar(tmp_path):
    """GNU tar's own layout (gnu format, directory members, long names, record padding) reads like ours."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    long = "q" * 120
    for key in ("k0", "k1", f"sub/{long}"):
        (src / f"{key}.json").write_text(json.dumps(_sft(os.path.basename(key))))
        (src / f"{key}.png").write_bytes(_png_bytes())
    out = tmp_path / "gnu.tar"
    try:
        subprocess.run(["tar", "--format=gnu", "--sort=name", "-cf", str(out), "-C", str(src), "."], check=True)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        pytest.skip(f"GNU tar not usable here: {e}")
    assert _outcomes(out) == ["./k0", "./k1", f"./sub/{long}"]
    with open(src / "k1.bin", "wb") as f:  # a sparse member (GNU and pax layouts): refused, not misread
        f.truncate(1 << 20)
    for fmt in ("gnu", "pax"):
        subprocess.run(["tar", "--sparse", f"--format={fmt}", "--sort=name", "-cf", str(out), "-C", str(src), "."],
                       check=True)
        assert _outcomes(out) == ["./k0", ("unsupported_member", "./k1"), f"./sub/{long}"]


def test_member_over_the_size_bound_is_skipped_unread(tmp_path):
    """A member over MAX_MEMBER_BYTES (a sparse file: nothing is written or read) costs only its own sample."""
    path = tmp_path / "big.tar"
    with open(path, "wb") as f:
        for name, data in _members(_good(["b0"])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512))
        info = tarfile.TarInfo("big.bin")
        info.size = MAX_MEMBER_BYTES + 1
        f.write(info.tobuf(tarfile.PAX_FORMAT))
        f.truncate(f.tell() + -(-info.size // 512) * 512)
        f.seek(0, 2)
        for name, data in _members(_good(["b1"])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            f.write(info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512))
        f.write(bytes(1024))
    t = time.perf_counter()
    assert _outcomes(path) == ["b0", ("member_too_large", "big"), "b1"]
    assert time.perf_counter() - t < 5


def test_huge_png_is_refused_from_its_header(tmp_path):
    """The issue's 12000 x 12000 PNG of ~140 KB (144 M pixels): refused before any pixel is decoded."""
    png = _blank_png(12000, 12000)
    assert len(png) < 200_000
    raw = {"__key__": "big", "__url__": "u.tar", "json": json.dumps(_sft("big")).encode(), "png": png}
    filters = list(warnings.filters)
    for max_pixels in (DEFAULT_MAX_PIXELS, 10 ** 12):  # the project's limit, then PIL's (warning -> error here)
        with pytest.raises(SampleError, match="shard u.tar key big: image png") as e:
            decode_sample(raw, max_pixels=max_pixels)
        assert e.value.reason == "image_too_large"
    assert warnings.filters == filters  # PIL's bomb warning became an error only inside decode_sample
    medium = _blank_png(3000, 2000)
    with pytest.raises(SampleError, match=r"3000x2000 = 6000000 pixels, over the limit of 5000000"):
        decode_sample(raw | {"png": medium}, max_pixels=5_000_000)
    _, images = decode_sample(raw | {"png": medium}, max_pixels=6_000_000)
    assert images[0].size == (3000, 2000)


def test_animated_image_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue", "green")]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    raw = {"__key__": "anim", "__url__": "u.tar", "json": json.dumps(_sft("anim")).encode(), "png": buf.getvalue()}
    _, images = decode_sample(raw)
    assert len(images) == 1 and images[0].getpixel((0, 0)) == (255, 0, 0)


def test_only_allow_listed_image_formats_are_decoded():
    """A GIF (or any other PIL format) under a .png name is not decoded: only PNG, JPEG and WebP decoders run."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="GIF")
    raw = {"__key__": "gif", "__url__": "u.tar", "json": json.dumps(_sft("gif")).encode(), "png": buf.getvalue()}
    with pytest.raises(SampleError, match="cannot be decoded") as e:
        decode_sample(raw)
    assert e.value.reason == "bad_image"


def test_text_validation_reasons(tmp_path):
    def reason(text):
        with pytest.raises(RecordError) as e:
            loads_record(text)
        return e.value.reason

    ok = json.dumps(_sft("ok"))
    assert loads_record(ok).id == "ok"
    nested = json.dumps(_sft("n") | {"meta": {"x": "D"}})
    assert loads_record(nested.replace('"D"', "[" * (MAX_JSON_DEPTH - 2) + "]" * (MAX_JSON_DEPTH - 2))).id == "n"
    assert reason(nested.replace('"D"', "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1))) == "bad_json"
    assert reason("[" * 200_000 + "]" * 200_000) == "bad_json"  # past json's recursion limit: no RecursionError
    assert reason(ok.replace('"ok"', '"\\udfff"')) == "bad_json"  # a lone low surrogate, in the id
    assert loads_record(ok.replace("What", "\\ud83d\\ude00")).id == "ok"  # a surrogate pair is one character
    assert reason(ok.encode().replace(b"What", b"\xed\xa0\x80")) == "bad_json"  # an encoded surrogate
    assert reason(b"\xef\xbb\xbf" + ok.encode()) == "bad_json"  # a UTF-8 BOM
    assert reason(ok.replace('"id"', '"x": -Infinity, "id"')) == "non_finite"
    assert reason(ok.replace('"id"', '"x": ' + "9" * 400 + ', "id"')) == "non_finite"
    assert reason(ok.replace('"id"', '"x": ' + "9" * 5000 + ', "id"')) == "bad_json"  # past Python's int limit
    assert reason(json.dumps(_pref("p", chosen="same", rejected="same"))) == "identical_pair"
    assert reason(json.dumps({"kind": "sft", "id": "x"})) == "bad_record"
    with pytest.raises(RecordError, match="lone"):  # ShardWriter refuses to write what the reader refuses
        ShardWriter(str(tmp_path / "w-%d.tar")).write(_sft("x") | {"meta": {"t": "\ud800"}})
    e = pickle.loads(pickle.dumps(RecordError("m", "identical_pair")))
    assert (e.reason, str(e)) == ("identical_pair", "m")


# ------------------------------------------------------------------------------------ through the data stream
def _expected(corpus) -> tuple[list[str], Counter, Counter]:
    """The corpus as one shard list (a directory is not a shard to ``expand_urls``): its paths, the record ids
    of its good samples and the errors per reason."""
    paths, ids, errors = [], Counter(), Counter()
    for name, (path, outcomes) in sorted(corpus.items()):
        if name == "directory":
            continue
        paths.append(path)
        errors.update(o[0] for o in outcomes if isinstance(o, tuple))
        for item in iter_shard(path):
            if not isinstance(item, SampleError):
                try:
                    ids[decode_sample(item)[0].id] += 1
                except SampleError:
                    pass
    return paths, ids, errors


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_counts_every_fault_and_delivers_every_good_sample(corpus, tiny_processor_backbone, workers):
    from vlalign.data.module import ShardDataModule

    paths, ids, errors = _expected(corpus)
    assert sum(ids.values()) == 30 and sum(errors.values()) == 24
    dm = ShardDataModule(train=paths, val=paths, batch_size=4, num_workers=workers, shuffle_buffer=8)
    dm.attach(tiny_processor_backbone, {"format": "sft"})
    got = Counter()
    for batch in dm.train_dataloader():
        batch = dm.on_before_batch_transfer(batch, 0)  # what the Trainer's loop does with each batch it takes
        got.update(batch["ids"])
    assert got == ids
    assert dm.skipped == errors
    got = Counter()
    for batch in dm.val_dataloader():
        got.update(dm.on_before_batch_transfer(batch, 0)["ids"])
    assert got == ids and dm.skipped_val == errors


def test_stream_raise_names_shard_key_and_reason(corpus, tiny_processor_backbone):
    from vlalign.data.module import ShardDataModule

    path, _ = corpus["corrupt_header"]
    dm = ShardDataModule(train=path, val=None, batch_size=2, num_workers=0, on_error="raise")
    dm.attach(tiny_processor_backbone, {"format": "sft"})
    with pytest.raises(SampleError, match=rf"shard {path} key c1: bad tar header at byte") as e:
        list(dm.train_dataloader())
    assert e.value.reason == "shard_corrupt"
