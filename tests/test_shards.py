"""Shards: writing, safe decoding (never unpickle), clear errors naming shard and key, skip-and-count."""

import io
import pickle

import pytest
from PIL import Image
from raw_tar import write_tar

from vlalign.data.schema import RecordError, parse_record, with_images
from vlalign.data.shards import SampleError, ShardWriter, decode_sample, read_shard


def _img(colour="red", size=48):
    return Image.new("RGB", (size, size), colour)


def _sft(i):
    return {"kind": "sft", "id": f"s{i}", "conversation": [{"role": "user", "content": "<image>\nWhat is it?"},
                                                         {"role": "assistant", "content": f"Shape {i}."}]}


def _pref(i, **extra):
    return {"kind": "preference", "id": f"p{i}", "prompt": "Describe the image.", "chosen": "A red circle.",
            "rejected": "A blue star.", **extra}


def test_write_and_read_back(tmp_path):
    with ShardWriter(str(tmp_path / "t-%03d.tar"), max_count=2) as w:
        for i in range(5):
            w.write(_sft(i), [_img()])
        w.write(_pref(9), [_img("blue"), _img("green")])
    assert len(w.paths) == 3
    got = [r for p in w.paths for r in read_shard(p)]
    assert [r.id for r, _ in got] == ["s0", "s1", "s2", "s3", "s4", "p9"]
    rec, images = got[-1]
    assert [im.getpixel((0, 0)) for im in images] == [(0, 0, 255), (0, 128, 0)]


def test_schema_validation_messages():
    with pytest.raises(RecordError, match="chosen"):
        parse_record({"kind": "preference", "id": "x", "prompt": "q", "rejected": "r"})
    with pytest.raises(RecordError, match="kind"):
        parse_record({"kind": "nope", "id": "x"})
    with pytest.raises(RecordError, match="assistant"):
        parse_record({"kind": "sft", "id": "x", "conversation": [{"role": "user", "content": "hi"}]})
    r = parse_record({"kind": "preference", "id": 3, "prompt": "q", "candidates": ["a", "b", "c"]})
    assert (r.chosen, r.rejected, r.id) == ("a", "c", "3")
    r = parse_record(_pref(1, ref_logps={"model": "m", "chosen": {"sum": -3, "mean": -1, "tokens": 3},
                                         "rejected": {"sum": -8, "mean": -2, "tokens": 4}}))
    assert r.ref_logps["rejected"].tokens == 4
    assert with_images([{"role": "user", "content": "q"}], 2)[0]["content"] == "<image>\n<image>\nq"
    with pytest.raises(RecordError, match="placeholders"):
        with_images([{"role": "user", "content": "<image> q"}], 2)


class _Boom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would create a file
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(tmp_path, tiny_processor_backbone):
    from vlalign.data.module import ShardDataModule

    canary = tmp_path / "pwned"
    evil = pickle.dumps(_Boom(str(canary)))
    png = io.BytesIO()
    _img().save(png, format="PNG")
    import json

    write_tar(tmp_path / "evil-000.tar", [("k1.json", json.dumps(_sft(1)).encode()), ("k1.png", png.getvalue()),
                                     ("k1.pyd", evil), ("k1.pickle", evil), ("k2.pyd", evil),
                                     ("k2.json", json.dumps(_sft(2)).encode()), ("k2.png", png.getvalue())])
    dm = ShardDataModule(train=str(tmp_path / "evil-*.tar"), val=None, batch_size=2, num_workers=0)
    dm.attach(tiny_processor_backbone, {"format": "sft"})
    batches = list(dm.train_dataloader())
    assert not canary.exists()
    assert sum(len(b["ids"]) for b in batches) == 2
    assert "pyd" not in batches[0] and "pickle" not in batches[0]


def test_corrupt_image_and_broken_json_name_shard_and_key(tmp_path, tiny_processor_backbone, caplog):
    import json

    from vlalign.data.module import ShardDataModule

    png = io.BytesIO()
    _img().save(png, format="PNG")
    path = tmp_path / "bad-000.tar"
    write_tar(path, [("good.json", json.dumps(_sft(1)).encode()), ("good.png", png.getvalue()),
                ("badimg.json", json.dumps(_sft(2)).encode()), ("badimg.png", b"\x89PNG not really"),
                ("badjson.json", b'{"kind": "sft", "id": '), ("badjson.png", png.getvalue())])
    with pytest.raises(SampleError, match=r"bad-000\.tar key badimg.*cannot be decoded"):
        decode_sample({"__url__": str(path), "__key__": "badimg", "json": json.dumps(_sft(2)).encode(),
                       "png": b"junk"})
    dm = ShardDataModule(train=str(path), val=None, batch_size=4, num_workers=0, on_error="raise")
    dm.attach(tiny_processor_backbone, {"format": "sft"})
    with pytest.raises(SampleError, match=r"bad-000\.tar key badimg"):
        list(dm.train_dataloader())
    dm = ShardDataModule(train=str(path), val=None, batch_size=4, num_workers=0, on_error="skip")
    dm.attach(tiny_processor_backbone, {"format": "sft"})
    batches = list(dm.train_dataloader())
    assert [i for b in batches for i in b["ids"]] == ["s1"]
    assert batches[-1]["skipped"] == {"bad_image": 1, "bad_json": 1}
    assert "key badjson" in caplog.text and "broken JSON" in caplog.text
