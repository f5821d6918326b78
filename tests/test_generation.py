"""Inference: model loading, batched generation (one text per prompt, deterministic), eval/generate.py and
eval/reward_accuracy.py on a real tiny model exported to disk."""

import json
import os
import sys
import tarfile
from collections import Counter

import pytest
from raw_tar import write_tar
import torch

from vlalign.backbone import Backbone, BackboneConfig
from vlalign.data.shards import SampleError
from vlalign.generation import (Sampling, View, count_samples, generate_views, load_model, model_fingerprint,
                                prompt_encode, read_samples, resolve_model)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval"))
import generate as eval_generate  # noqa: E402  (eval/generate.py)
import pope
import reward_accuracy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "export"
    Backbone(BackboneConfig()).build().export_merged(str(out / "merged"))
    return str(out)


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, device="cpu")


def _answers(model, urls, batch_size, views, limit=5, seed=0):
    out = generate_views(model, read_samples(urls, limit), views, prompt_encode(model), batch_size, seed=seed,
                         progress=False)
    return [(r.id, texts) for r, _, texts in out]


def test_one_text_per_prompt_and_greedy_is_deterministic(model, shapes_dir):
    urls = f"{shapes_dir}/prompts/train-*.tar"
    greedy = {"a": View(Sampling(max_new_tokens=6))}
    first = _answers(model, urls, 2, greedy)
    assert len(first) == 5 and all(isinstance(t["a"], str) for _, t in first)
    # the batch a prompt lands in (and so its left padding) does not change a greedy answer
    assert first == _answers(model, urls, 5, greedy)


def test_sampling_is_reproducible_under_a_seed(model, shapes_dir):
    urls = f"{shapes_dir}/prompts/train-*.tar"
    views = {"s": View(Sampling(max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9))}
    assert _answers(model, urls, 3, views, limit=3, seed=1) == _answers(model, urls, 3, views, limit=3, seed=1)


def test_pixel_transform_changes_what_the_model_sees(model, shapes_dir):
    seen = []

    def blank(pixels, record_id):
        seen.append(record_id)
        return torch.zeros_like(pixels)

    urls = f"{shapes_dir}/prompts/train-*.tar"
    out = _answers(model, urls, 2, {"blank": View(Sampling(2), pixel_transform=blank)}, limit=3)
    assert [i for i, _ in out] == seen  # called once per record, with its id


def _damaged_prompt_shards(root) -> tuple[list[str], list[str]]:
    """Two prompt shards: the first with an undecodable image in its third sample, the second cut off inside its
    last sample's image. Returns (paths, ids of the good samples in order)."""
    from PIL import Image

    from vlalign.data.shards import ShardWriter

    def rec(i):
        return {"kind": "prompt", "id": f"q{i}", "prompt": "<image>\nWhat is it?", "answer": "A shape."}

    image = Image.new("RGB", (16, 16), "red")
    with ShardWriter(str(root / "p-%06d.tar"), max_count=4) as w:
        for i in range(8):
            w.write(rec(i), [b"not an image" if i == 2 else image])
    with tarfile.open(w.paths[1]) as tar:
        cut = tar.getmember(f"{w.total - 1:09d}.png").offset_data + 10  # inside the last sample's image
    with open(w.paths[1], "r+b") as f:
        f.truncate(cut)
    return w.paths, [f"q{i}" for i in range(8) if i not in (2, 7)]


def test_read_samples_counts_a_bad_sample_and_a_truncated_shard(tmp_path):
    paths, good = _damaged_prompt_shards(tmp_path)
    skipped = Counter()
    assert [r.id for r, _ in read_samples(paths, skipped=skipped)] == good  # every good sample, in order
    assert skipped == {"bad_image": 1, "shard_truncated": 1}
    skipped = Counter()
    assert [r.id for r, _ in read_samples(paths, limit=2, skipped=skipped)] == good[:2] and skipped == {}
    assert [r.id for r, _ in read_samples(paths, limit=3, skipped=skipped)] == good[:3]  # the limit counts good ones
    assert skipped == {"bad_image": 1}
    with pytest.raises(SampleError, match="cannot be decoded") as e:  # without a counter: raised, shard and key
        list(read_samples(paths))
    assert (e.value.reason, e.value.shard, e.value.key) == ("bad_image", paths[0], "000000002")
    skipped = Counter()  # the pixel limit: read from the header, before decoding
    assert list(read_samples(paths, skipped=skipped, max_pixels=15 * 16)) == []
    assert skipped == {"image_too_large": 6, "bad_image": 1, "shard_truncated": 1}
    (tmp_path / "empty.tar").write_bytes(b"")  # the progress-bar count never fails on what the reader reports
    assert count_samples(paths + [str(tmp_path / "empty.tar"), str(tmp_path / "missing.tar")]) == 8


def test_model_resolution(model_dir, tmp_path):
    assert resolve_model(model_dir) == os.path.join(model_dir, "merged")
    assert resolve_model(os.path.join(model_dir, "merged")) == os.path.join(model_dir, "merged")
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="trainable weights only"):
        resolve_model(str(ckpt))
    with pytest.raises(FileNotFoundError):
        resolve_model(str(tmp_path))
    assert model_fingerprint(model_dir) == model_fingerprint(os.path.join(model_dir, "merged"))
    assert model_fingerprint(model_dir).startswith("export@")


def test_eval_generate_pope_and_captions(model_dir, shapes_dir, tmp_path):
    ev = f"{shapes_dir}/eval"
    out = tmp_path / "pope.jsonl"
    summary = eval_generate.main(["--model", model_dir, "--questions", f"{ev}/pope_random.jsonl", "--image-root",
                                  f"{ev}/images", "--out", str(out), "--limit", "5", "--batch-size", "2",
                                  "--max-new-tokens", "4", "--device", "cpu", "--no-progress"])
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    questions = [json.loads(l) for l in open(f"{ev}/pope_random.jsonl")][:5]
    assert summary["answered"] == 5
    assert [l["question_id"] for l in lines] == [q["question_id"] for q in questions]
    assert set(pope.load_answers(str(out))) == {str(q["question_id"]) for q in questions}

    out = tmp_path / "captions.jsonl"
    eval_generate.main(["--model", model_dir, "--questions", f"{ev}/captions_prompts.jsonl", "--image-root",
                        f"{ev}/images", "--out", str(out), "--limit", "3", "--max-new-tokens", "4", "--device", "cpu",
                        "--no-progress"])
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [sorted(l) for l in lines] == [["image_id", "text"]] * 3

    out = tmp_path / "shards.jsonl"
    eval_generate.main(["--model", model_dir, "--shards", f"{shapes_dir}/prompts/test-*.tar", "--id-key", "image_id",
                        "--out", str(out), "--limit", "3", "--max-new-tokens", "4", "--device", "cpu",
                        "--no-progress"])
    ids = [json.loads(l)["image_id"] for l in out.read_text().splitlines()]
    assert len(ids) == 3 and all(i.startswith("shapes-test-") for i in ids)


def test_reward_metrics_by_hand():
    m = reward_accuracy.reward_metrics([1.0, 2.0, 3.0], [0.0, 3.0, 1.0])
    assert m["accuracy"] == pytest.approx(2 / 3) and m["margin_mean"] == pytest.approx(2 / 3)
    assert m["reward_mean"] == pytest.approx(10 / 6) and m["n"] == 3
    assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
    assert reward_accuracy.reward_metrics([1.0], [1.0])["accuracy"] == 0.0  # a tie is not a win
    groups = reward_accuracy.grouped_accuracy(["a", "b", "c", "d"], [1.0, 2.0, 3.0, 0.0], [0.0, 3.0, 1.0, 0.0],
                                              {"a": "x", "b": "x", "c": "y"})
    assert groups == {"(none)": {"accuracy": 0.0, "n": 1}, "x": {"accuracy": 0.5, "n": 2},
                      "y": {"accuracy": 1.0, "n": 1}}


def test_reward_accuracy_on_shards(shapes_dir, tmp_path):
    from vlalign.reward import save_head, value_head

    bb = Backbone(BackboneConfig()).build()
    export = tmp_path / "reward"
    bb.export_merged(str(export / "merged"))
    torch.manual_seed(0)
    save_head(value_head(bb.model.config.text_config.hidden_size), str(export), bb)
    out = tmp_path / "metrics.json"
    m = reward_accuracy.main(["--reward-model", str(export), "--shards", f"{shapes_dir}/preference/val-*.tar",
                              "--batch-size", "16", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert m["n"] == 60 and not m["skipped"] and 0.0 <= m["accuracy"] <= 1.0
    assert json.loads(out.read_text())["accuracy"] == m["accuracy"]
    by = m["by_group"]["corruption"]  # the shapes world's records say how the rejected answer was corrupted
    assert sum(g["n"] for g in by.values()) == 60 and "(none)" not in by and "flipped_answer" in by


def test_reward_accuracy_counts_bad_samples_and_a_truncated_shard(shapes_dir, reward_export, tmp_path):
    """Pairs are read as training reads them: a bad image, an identical pair and a shard cut off inside its last
    sample are counted per reason; every good pair is scored. Shards without any good pair stop the script with
    the counts (the stream's accounting-only item)."""
    import io

    from vlalign.data.shards import iter_shard

    raws = [r for _, r in zip(range(7), iter_shard(f"{shapes_dir}/preference/val-000000.tar"))]
    members = []
    for i, raw in enumerate(raws):
        record = json.loads(raw["json"])
        if i == 2:
            record["rejected"] = record["chosen"]  # identical_pair (ShardWriter would refuse to write it)
        members += [(f"k{i}.json", json.dumps(record).encode()), (f"k{i}.png", b"no image" if i == 1 else raw["png"])]
    paths = [str(tmp_path / "p-0.tar"), str(tmp_path / "p-1.tar")]
    write_tar(paths[0], members[:8])
    write_tar(paths[1], members[8:], cut_inside="k6.png")  # ends inside the last sample's image
    args = ["--reward-model", reward_export[1], "--batch-size", "2", "--device", "cpu", "--no-progress"]
    m = reward_accuracy.main(args + ["--shards", str(tmp_path / "p-*.tar")])
    assert m["skipped"] == {"bad_image": 1, "identical_pair": 1, "shard_truncated": 1} and m["skipped_total"] == 3
    assert m["n"] == 4 and sum(g["n"] for g in m["by_group"]["corruption"].values()) == 4
    with pytest.raises(SystemExit, match="skipped 3 samples: image_too_large 2, shard_truncated 1"):
        reward_accuracy.main(args + ["--shards", paths[1], "--max-image-pixels", "1"])
