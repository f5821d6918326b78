"""The shapes world: every shard reads back, builds are byte-deterministic, POPE / CHAIR files follow their
definitions, preference pairs are right by construction, and ensure_shapes rebuilds only when it must."""

import glob
import hashlib
import importlib.util
import json
import os
import random
import re
from collections import Counter, defaultdict

import pytest
from chair import build_vocab, chair_metrics, evaluate as chair_evaluate, find_objects  # eval/, via conftest

from vlalign.data import shapes as S
from vlalign.data.shards import read_shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(train_images=40, val_images=10, test_images=20, shard_size=16, progress=False)
KINDS = {"sft": "sft", "preference": "preference", "prompts": "prompt"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "shapes"
    return str(out), S.build_shapes(str(out), **SMALL)


def _digests(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _records(root, name):
    """``[(record, images)]`` of a shard set such as ``"preference/train"``."""
    return [r for p in sorted(glob.glob(f"{root}/{name}-*.tar")) for r in read_shard(p)]


def _load_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _load(root, rel):
    with open(os.path.join(root, rel)) as f:
        return json.load(f)


def test_every_shard_reads_back_with_one_image(world):
    root, summary = world
    assert set(summary["shards"]) == {"sft/train", "sft/val", "preference/train", "preference/val",
                                      "prompts/train", "prompts/test"}
    ids = {}
    for name, paths in summary["shards"].items():
        assert sorted(paths) == sorted(os.path.relpath(p, root) for p in glob.glob(f"{root}/{name}-*.tar"))
        got = _records(root, name)
        assert len(got) == summary["counts"][name] == SMALL[name.split("/")[1] + "_images"]
        assert len(paths) == -(-len(got) // SMALL["shard_size"])
        for record, images in got:
            assert record.kind == KINDS[name.split("/")[0]]
            assert len(images) == 1 and images[0].size == (48, 48)
        ids[name] = [r.id for r, _ in got]
        assert len(set(ids[name])) == len(ids[name])
    # one record of each kind per training image, under the image's id
    assert ids["sft/train"] == ids["preference/train"] == ids["prompts/train"]


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    root, _ = world
    again = S.build_shapes(str(tmp_path / "again"), **SMALL)
    assert _digests(root) == _digests(again["out_dir"])
    other = _digests(S.build_shapes(str(tmp_path / "other"), **{**SMALL, "seed": 1})["out_dir"])
    mine = _digests(root)
    for name in ("sft/train-000000.tar", "preference/val-000000.tar", "prompts/test-000000.tar",
                 "eval/pope_random.jsonl"):
        assert other[name] != mine[name], name


def test_splits_are_disjoint_images(world):
    root, _ = world

    def pixels(name):
        return {im.tobytes() for _, (im,) in _records(root, name)}

    train, val, test = pixels("sft/train"), pixels("sft/val"), pixels("prompts/test")
    assert not (train & val) and not (train & test) and not (val & test)


def _pope_by_image(questions):
    by = defaultdict(lambda: {"yes": [], "no": []})
    for q in questions:
        shape = re.fullmatch(r"Is there a (\w+) in the image\?", q["text"]).group(1)
        by[q["image"][:-len(".png")]][q["label"]].append(shape)
    return by


def test_pope_files_are_balanced_correct_and_follow_their_strategy(world):
    root, _ = world
    gt = _load(root, "eval/chair_gt.json")
    files = {s: _load_jsonl(f"{root}/eval/pope_{s}.jsonl") for s in S.STRATEGIES}
    all_ids = [q["question_id"] for qs in files.values() for q in qs]
    assert len(all_ids) == len(set(all_ids)) and all(isinstance(i, int) for i in all_ids)

    # the strategies, re-derived from the ground truth alone
    freq = Counter(s for objs in gt.values() for s in objs)
    cooc = Counter((a, b) for objs in gt.values() for a in objs for b in objs if a != b)
    order = {s: i for i, s in enumerate(S.SHAPES)}
    by_image = {s: _pope_by_image(qs) for s, qs in files.items()}
    for strategy, questions in files.items():
        assert all(list(q) == ["question_id", "image", "text", "label"] for q in questions)
        labels = Counter(q["label"] for q in questions)
        assert labels["yes"] == labels["no"] > 0
        for image_id, asked in by_image[strategy].items():
            present = gt[image_id]
            absent = [s for s in S.SHAPES if s not in present]
            k = min(S.POPE_PER_IMAGE, len(present), len(absent))
            assert len(asked["yes"]) == len(asked["no"]) == k
            assert set(asked["yes"]) <= set(present) and set(asked["no"]) <= set(absent)
            assert asked["yes"] == by_image["random"][image_id]["yes"]  # same positives in every file
            if strategy == "popular":
                want = sorted(absent, key=lambda s: (-freq[s], order[s]))[:k]
                assert sorted(asked["no"]) == sorted(want), image_id
            if strategy == "adversarial":
                want = sorted(absent, key=lambda s: (-sum(cooc[p, s] for p in present), -freq[s], order[s]))[:k]
                assert sorted(asked["no"]) == sorted(want), image_id
    assert set(by_image["random"]) == set(gt)
    negatives = {s: {i: sorted(a["no"]) for i, a in by_image[s].items()} for s in S.STRATEGIES}
    assert negatives["popular"] != negatives["random"] and negatives["popular"] != negatives["adversarial"]


def test_world_statistics_separate_popular_from_adversarial():
    rng = random.Random(0)
    stats = S.shape_stats([S.sample_scene(rng, str(i)).shapes for i in range(4000)])
    freq = [stats.frequency[s] for s in S.SHAPES]
    assert max(freq) == stats.frequency["circle"] and max(freq) > 1.8 * min(freq)
    for shape in S.SHAPES:  # each type co-occurs most with its partner, which is not the most popular type
        partners = {b: stats.cooccurrence[shape, b] for b in S.SHAPES if b != shape}
        assert max(partners, key=partners.get) == S.PARTNERS[shape]


def test_chair_inputs_match_prompts_and_score_ground_truth_perfectly(world):
    root, _ = world
    gt = _load(root, "eval/chair_gt.json")
    vocab = _load(root, "eval/chair_vocab.json")
    prompts = _records(root, "prompts/test")
    assert {r.id: r.objects for r, _ in prompts} == gt
    assert set(vocab) == set(S.SHAPES)
    caps = _load_jsonl(f"{root}/eval/captions_prompts.jsonl")
    assert [c["image_id"] for c in caps] == list(gt) and {c["text"] for c in caps} == {"Describe the image."}
    for (record, (image,)), cap in zip(prompts, caps):
        with open(f"{root}/eval/images/{cap['image']}", "rb") as f:
            from PIL import Image

            assert Image.open(f).convert("RGB").tobytes() == image.tobytes()
        assert record.prompt[-1]["content"].endswith("Describe the image.")
    details = chair_evaluate([{"image_id": r.id, "text": r.answer} for r, _ in prompts], vocab, gt)
    metrics = chair_metrics(details)
    assert metrics["chair_s"] == 0 and metrics["chair_i"] == 0 and metrics["recall"] == 1


def _number(text):
    return S.NUMBERS.index(text.rstrip(".").lower())


def test_preference_pairs_are_right_by_construction(world):
    root, _ = world
    vocab = build_vocab(S.CHAIR_SYNONYMS)
    seen = Counter()
    for name in ("preference/train", "preference/val"):
        for record, _ in _records(root, name):
            meta, scene = record.meta, record.meta["scene"]
            shapes = {o["shape"]: o for o in scene}
            assert record.chosen != record.rejected
            seen[meta["corruption"]] += 1
            question = record.prompt[-1]["content"].split("\n")[-1]
            if meta["task"] == "caption":
                assert {c for _, c in find_objects(record.chosen, vocab)} == set(shapes)
                for o in scene:
                    assert f"{o['colour']} {o['shape']}" in record.chosen
                assert re.search(rf"\b{S.NUMBERS[len(scene)]} shape", record.chosen, re.I)
                if meta["corruption"] == "hallucinated_object":
                    assert {c for _, c in find_objects(record.rejected, vocab)} - set(shapes)
                assert record.candidates[:2] == [record.chosen, record.rejected]
                assert len(set(record.candidates)) == 3
                assert [len(c) for c in meta["corruptions"]] == [0, 1, 2]
                assert all(set(s) == set(S.ATTRIBUTES) and all(v in range(5) for v in s.values())
                           for s in record.scores)
                total = [s["helpfulness"] + s["correctness"] + s["coherence"] for s in record.scores]
                assert total[0] > total[1] > total[2] and total[0] - total[1] >= 2
            elif meta["task"] == "yes_no":
                shape = re.fullmatch(r"Is there a (\w+) in the image\?", question).group(1)
                assert record.chosen == ("Yes." if shape in shapes else "No.")
                assert meta["label"] == record.chosen.rstrip(".").lower()
            elif meta["corruption"] == "wrong_count":
                assert _number(record.chosen) == len(scene) != _number(record.rejected)
            elif meta["corruption"] == "wrong_colour":
                assert record.chosen == shapes[meta["shape"]]["colour"].capitalize() + "."
            elif meta["corruption"] == "wrong_position":
                assert record.chosen == f"In the {shapes[meta['shape']]['position']}."
            elif meta["corruption"] == "wrong_shape":
                (o,) = [o for o in scene if o["colour"] == meta["colour"]]
                assert record.chosen == f"A {o['shape']}."
    assert {"hallucinated_object", "wrong_colour", "wrong_count", "flipped_answer"} <= set(seen)


def test_sft_conversations_answer_correctly_and_mix_tasks(world):
    root, _ = world
    tasks = Counter()
    for record, _ in _records(root, "sft/train") + _records(root, "sft/val"):
        conv, shapes = record.conversation, {o["shape"] for o in record.meta["scene"]}
        tasks[record.meta["task"]] += 1
        assert conv[0]["role"] == "user" and conv[0]["content"].startswith("<image>\n")
        assert sum(t["content"].count("<image>") for t in conv) == 1
        assert [t["role"] for t in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert (len(conv) // 2 in (2, 3)) == (record.meta["task"] == "multi_turn")
        for q, a in zip(conv[::2], conv[1::2]):
            m = re.search(r"Is there a (\w+) in the image\?", q["content"])
            if m:
                assert a["content"] == ("Yes." if m.group(1) in shapes else "No.")
            if q["content"].endswith("How many shapes are there?"):
                assert _number(a["content"]) == len(shapes)
    assert set(tasks) == set(S.SFT_TASKS)

    # yes/no questions are balanced (checked on many records, without drawing)
    rng = random.Random(0)
    scenes = [S.sample_scene(rng, str(i)) for i in range(2000)]
    stats = S.shape_stats([s.shapes for s in scenes])
    answers = Counter(S.ask(s, "yes_no", rng, stats).answer for s in scenes)
    assert abs(answers["Yes."] - answers["No."]) < 0.1 * len(scenes)


def test_corpus_covers_every_word_of_the_world(world):
    root, _ = world
    texts = []
    for name in ("sft/train", "preference/train", "prompts/test"):
        for record, _ in _records(root, name):
            turns = record.conversation if record.kind == "sft" else record.prompt
            texts += [t["content"].replace("<image>", "") for t in turns]
            if record.kind == "preference":
                texts += [record.chosen, record.rejected, *(record.candidates or [])]
            if record.kind == "prompt":
                texts += [record.answer, *record.objects]
    words = set(re.findall(r"[A-Za-z]+", " ".join(S.corpus())))
    assert set(re.findall(r"[A-Za-z]+", " ".join(texts))) <= words
    assert S.corpus() == S.corpus()


def test_ensure_shapes_builds_only_when_needed(tmp_path):
    out = str(tmp_path / "data" / "shapes")
    first = S.ensure_shapes(out, **SMALL)
    assert first["built"] and S.read_manifest(out)["args"]["train_images"] == SMALL["train_images"]
    sentinel = os.path.join(out, "sentinel")
    open(sentinel, "w").close()
    again = S.ensure_shapes(out, **SMALL)
    assert not again["built"] and os.path.exists(sentinel)
    changed = S.ensure_shapes(out, **{**SMALL, "train_images": 30})
    assert changed["built"] and not os.path.exists(sentinel)
    assert S.read_manifest(out)["args"]["train_images"] == 30
    assert len(_records(out, "sft/train")) == 30
    # a missing file (a half-deleted world) also rebuilds
    os.remove(os.path.join(out, "eval", "pope_popular.jsonl"))
    assert S.ensure_shapes(out, **{**SMALL, "train_images": 30})["built"]
    assert os.listdir(tmp_path / "data") == ["shapes"]  # no temporary directories left behind


def test_interrupted_build_is_never_mistaken_for_complete(tmp_path, monkeypatch):
    out = str(tmp_path / "shapes")
    S.build_shapes(out, **SMALL)
    before = _digests(out)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "pope_questions", boom)
    with pytest.raises(KeyboardInterrupt):
        S.build_shapes(out, **{**SMALL, "seed": 5})
    assert _digests(out) == before  # the old world is untouched
    with pytest.raises(KeyboardInterrupt):
        S.build_shapes(str(tmp_path / "fresh"), **SMALL)
    assert sorted(os.listdir(tmp_path)) == ["shapes"]


def test_refuses_to_replace_a_directory_it_did_not_make(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        S.ensure_shapes(str(out), **SMALL)
    assert (out / "precious.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert S.ensure_shapes(str(empty), **SMALL)["built"]


def test_cli_builds_then_keeps(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("shapes_cli", os.path.join(ROOT, "data_prep", "shapes.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--out", str(tmp_path / "w"), "--train-images", "12", "--val-images", "4", "--test-images", "6",
            "--quiet"]
    assert cli.main(argv)["built"]
    assert "sft/train" in capsys.readouterr().out
    assert not cli.main(argv)["built"]
    assert "already holds" in capsys.readouterr().out
