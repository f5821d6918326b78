"""Inference: model loading, batched generation (one text per prompt, deterministic), eval/generate.py and
eval/reward_accuracy.py on a real tiny model exported to disk."""

import json
import os
import sys

import pytest
import torch

from vlalign.backbone import Backbone, BackboneConfig
from vlalign.generation import (Sampling, View, generate_views, load_model, model_fingerprint, prompt_encode,
                                read_samples, resolve_model)

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
