"""AMBER: object matching, every metric worked out by hand on records in AMBER's published layout, the CLI on
AMBER's and eval/generate.py's answer formats, and eval/generate.py -> eval/amber.py on a real tiny model."""

import json

import pytest

import amber as eval_amber  # eval/amber.py (conftest puts eval/ on the path)
from vlalign.metrics.amber import (amber_score, build_lexicon, discriminative_metrics, extract_objects,
                                   index_annotations, score_answers, score_description, singular, summarise)

# relation.json: object -> associated words (the keys and every listed word form the object vocabulary)
RELATION = {
    "person": ["man", "woman", "people"], "man": ["person", "people"], "dog": ["puppy"], "grass": ["ground"],
    "sky": [], "cloud": [], "ship": [], "tree": ["forest"], "forest": ["tree"], "cat": [], "frisbee": [],
    "bench": ["chair"], "light": [], "glove": [], "knife": [], "bus": [], "glass": [],
}
SAFE_WORDS = "light\nsign"  # safe_words.txt: one word a line, no final newline (as published)

ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["person", "dog", "grass"], "hallu": ["cat", "frisbee"]},
    {"id": 2, "type": "generative", "truth": ["sky", "ship", "ship"], "hallu": ["cloud", "bench"]},
    {"id": 3, "type": "generative", "truth": ["tree"], "hallu": ["dog"]},
    {"id": 4, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 5, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 6, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 7, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 8, "type": "discriminative-attribute-state", "truth": "yes"},
    {"id": 9, "type": "discriminative-attribute-state", "truth": "no"},
    {"id": 10, "type": "discriminative-attribute-number", "truth": "no"},
    {"id": 11, "type": "discriminative-attribute-number", "truth": "no"},
    {"id": 12, "type": "discriminative-attribute-action", "truth": "yes"},
    {"id": 13, "type": "discriminative-relation", "truth": "yes"},
    {"id": 14, "type": "relation", "truth": "no"},
]
RESPONSES = {
    # mentions man, frisbee, dog(s), grass, light: man covers person (an associated word), light is a safe
    # word (not hallucinated, still counted), frisbee hallucinated and a hallu entry -> 1 of 5, truth 3/3, hallu 1/2
    1: "A man throws a frisbee to two dogs on the grass under a street light.",
    # ship(s), sky; 'cloudy' is not 'cloud'; the second 'ship' entry cannot be covered -> 0 of 2, truth 2/3, 0/2
    2: "Two ships sail under a cloudy sky.",
    # dog(s), puppy, forest, Dog: forest covers tree; dog and puppy are hallucinated, both cover 'dog'
    # -> 3 of 4, truth 1/1, hallu 1/1
    3: "Dogs and a puppy sit by the forest. The Dog is happy.",
    4: "No, there is not.", 5: "Yes", 6: "yes.", 7: "There is one.",  # no, yes, yes, unparsable
    8: "Yes", 9: "No",
    10: "Yes", 11: "No",
    12: "No",
    13: "Yes", 14: "No",
}
QUERIES = [{"id": i, "image": f"AMBER_{min(i, 3)}.jpg",
            "query": "Describe this image." if i <= 3 else "Is there a dog in this image?"} for i in range(1, 15)]


@pytest.fixture
def lexicon():
    return build_lexicon(RELATION, SAFE_WORDS.split("\n"))


@pytest.fixture
def amber_dir(tmp_path):
    """AMBER's data/ folder layout: annotations.json, relation.json, safe_words.txt, query/query_all.json."""
    data = tmp_path / "data"
    (data / "query").mkdir(parents=True)
    (data / "annotations.json").write_text(json.dumps(ANNOTATIONS, indent=4))
    (data / "relation.json").write_text(json.dumps(RELATION, indent=4))
    (data / "safe_words.txt").write_text(SAFE_WORDS)
    (data / "query" / "query_all.json").write_text(json.dumps(QUERIES, indent=4))
    (data / "query" / "query_generative.json").write_text(json.dumps(QUERIES[:3], indent=4))
    return data


def test_singular_and_mentions(lexicon):
    vocab = lexicon.vocab
    assert [singular(t, vocab) for t in ["dogs", "men", "gloves", "knives", "benches", "buses", "glasses",
                                         "puppies", "people", "chairs", "cloudy", "sign"]] == \
        ["dog", "man", "glove", "knife", "bench", "bus", "glass", "puppy", "people", "chair", None, None]
    # case-insensitive, whole words only, a hyphenated word stays whole, repeats kept
    assert extract_objects("Two Dogs, a hot-dog and a man's dog; dogma.", vocab) == ["dog", "man", "dog"]


def test_description_matching_keeps_official_order(lexicon):
    d = score_description(RESPONSES[1], ["person", "dog", "grass"], ["cat", "frisbee"], lexicon)
    assert d == {"mentions": ["man", "frisbee", "dog", "grass", "light"], "hallucinated": ["frisbee"],
                 "truth_covered": [True, True, True], "hallu_covered": [False, True]}
    # "man" is found among person's associated words before the entry "man": it covers person only
    assert score_description("a man", ["person", "man"], [], lexicon)["truth_covered"] == [True, False]
    # a safe word that is a truth object is not hallucinated but covers nothing
    assert score_description("a light", ["light"], [], lexicon) == {
        "mentions": ["light"], "hallucinated": [], "truth_covered": [False], "hallu_covered": []}
    with pytest.raises(ValueError, match="'unicorn' is not a key of relation.json"):
        score_description("a dog", ["unicorn"], [], lexicon)


def test_every_metric_by_hand(lexicon):
    items = score_answers(index_annotations(ANNOTATIONS), RESPONSES, lexicon)
    s = summarise(items)
    g = s["generative"]
    assert (g["mentions"], g["hallucinated_mentions"], g["n"]) == (11, 4, 3)
    assert g["chair"] == pytest.approx(4 / 11)  # 1 + 0 + 3 of 5 + 2 + 4
    assert g["cover"] == pytest.approx(6 / 7)  # 3 + 2 + 1 of 3 + 3 + 1
    assert g["hal"] == pytest.approx(2 / 3)  # descriptions 1 and 3
    assert g["cog"] == pytest.approx(2 / 5)  # 1 + 0 + 1 of 2 + 2 + 1

    d = s["discriminative"]
    # "no" is the positive class: precision = caught / answered no, recall = caught / truth no
    expected = {  # name: (accuracy, precision, recall, f1, n)
        "existence": (2 / 4, 1 / 1, 1 / 2, 2 / 3, 4),  # preds no, yes, yes, None
        "state": (1.0, 1.0, 1.0, 1.0, 2),
        "number": (1 / 2, 1 / 1, 1 / 2, 2 / 3, 2),
        "action": (0.0, 0.0, 0.0, 0.0, 1),  # one wrong "no": precision 0/1, recall 0/0 -> 0
        "attribute": (3 / 5, 2 / 3, 2 / 3, 2 / 3, 5),  # state + number + action pooled
        "relation": (1.0, 1.0, 1.0, 1.0, 2),  # 'discriminative-relation' and plain 'relation'
        "overall": (7 / 11, 4 / 5, 4 / 6, 8 / 11, 11),  # f1 = 2 (4/5)(2/3) / (4/5 + 2/3) = 8/11
    }
    for name, (acc, p, r, f1, n) in expected.items():
        got = d[name]
        assert (got["accuracy"], got["precision"], got["recall"], got["f1"], got["n"]) == pytest.approx(
            (acc, p, r, f1, n)), name
    assert d["existence"]["unparsed"] == 1 and d["overall"]["answered_no"] == 5
    assert s["amber_score"] == pytest.approx((1 - 4 / 11 + 8 / 11) / 2) == pytest.approx(15 / 22)
    assert amber_score(0.0, 1.0) == 1.0


def test_answer_rules_and_edge_cases(lexicon):
    ann = index_annotations(ANNOTATIONS)
    exact = summarise(score_answers(ann, RESPONSES, lexicon, rule="exact"))["discriminative"]["existence"]
    # the official scorer's rule: "No, there is not." and "yes." are neither Yes nor No
    assert (exact["accuracy"], exact["answered_no"], exact["unparsed"]) == (0.0, 0, 3)
    pope = summarise(score_answers(ann, RESPONSES, lexicon, rule="pope"))["discriminative"]["existence"]
    assert pope["unparsed"] == 0 and pope["accuracy"] == pytest.approx(3 / 4)  # "There is one." -> yes
    assert discriminative_metrics([], [])["f1"] == 0.0
    only_questions = summarise(score_answers(ann, {4: "No"}, None))
    assert only_questions["generative"] is None and only_questions["amber_score"] is None
    with pytest.raises(ValueError, match="needs relation.json"):
        score_answers(ann, {1: "A dog."}, None)
    with pytest.raises(ValueError, match="answer id 99"):
        score_answers(ann, {99: "Yes"}, lexicon)
    with pytest.raises(ValueError, match="id 4 has unknown type 'discriminative-colour'"):
        index_annotations([{"id": 4, "type": "discriminative-colour", "truth": "no"}])


def test_cli_on_amber_and_generate_formats(amber_dir, tmp_path, capsys):
    # AMBER's own response format: one JSON list of {id, response}
    official = tmp_path / "answers.json"
    official.write_text(json.dumps([{"id": i, "response": r} for i, r in RESPONSES.items()], indent=4))
    out = tmp_path / "amber.json"
    result = eval_amber.main(["--annotations", str(amber_dir / "annotations.json"), "--queries",
                              str(amber_dir / "query" / "query_all.json"), "--answers", str(official),
                              "--out", str(out)])
    table = capsys.readouterr().out
    assert "CHAIR" in table and "  state" in table and "AMBER score (%)" in table and "68.2" in table
    saved = json.loads(out.read_text())
    assert saved["generative"]["chair"] == pytest.approx(4 / 11) and saved["amber_score"] == pytest.approx(15 / 22)
    assert saved["word_association"] == str(amber_dir / "relation.json")  # found next to annotations.json
    assert result["missing"] == result["ignored"] == 0

    # eval/generate.py's format, split over two files, scored on the generative queries only
    gen, disc = tmp_path / "gen.jsonl", tmp_path / "disc.jsonl"
    gen.write_text("".join(json.dumps({"question_id": i, "text": RESPONSES[i]}) + "\n" for i in (1, 2, 3)))
    disc.write_text("".join(json.dumps({"question_id": i, "text": RESPONSES[i]}) + "\n" for i in range(4, 15)))
    result = eval_amber.main(["--annotations", str(amber_dir / "annotations.json"), "--queries",
                              str(amber_dir / "query" / "query_generative.json"), "--answers", str(gen), str(disc)])
    assert result["generative"]["cog"] == pytest.approx(2 / 5) and result["discriminative"] == {}
    assert result["ignored"] == 11 and result["amber_score"] is None

    # a query without an answer fails, or is left out and counted
    args = ["--annotations", str(amber_dir / "annotations.json"), "--queries",
            str(amber_dir / "query" / "query_all.json"), "--answers", str(gen)]
    with pytest.raises(SystemExit) as e:
        eval_amber.main(args)
    assert e.value.code == 2 and "11 queries have no answer" in capsys.readouterr().err
    assert eval_amber.main(args + ["--allow-missing"])["missing"] == 11

    questions = tmp_path / "questions.jsonl"
    eval_amber.main(["--queries", str(amber_dir / "query" / "query_all.json"), "--to-questions", str(questions)])
    lines = [json.loads(l) for l in questions.read_text().splitlines()]
    assert lines[0] == {"question_id": 1, "image": "AMBER_1.jpg", "text": "Describe this image."} and len(lines) == 14


def test_generate_then_amber_end_to_end(amber_dir, tmp_path):
    """AMBER queries -> eval/generate.py on a real tiny exported model -> eval/amber.py."""
    from PIL import Image

    import generate as eval_generate  # eval/generate.py
    from vlalign.backbone import Backbone, BackboneConfig

    model = tmp_path / "export"
    Backbone(BackboneConfig()).build().export_merged(str(model / "merged"))
    images = tmp_path / "image"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue"], 1):
        Image.new("RGB", (32, 32), colour).save(images / f"AMBER_{i}.jpg")
    questions, answers = tmp_path / "questions.jsonl", tmp_path / "answers.jsonl"
    eval_amber.main(["--queries", str(amber_dir / "query" / "query_all.json"), "--to-questions", str(questions)])
    eval_generate.main(["--model", str(model), "--questions", str(questions), "--image-root", str(images),
                        "--out", str(answers), "--max-new-tokens", "4", "--batch-size", "7", "--device", "cpu",
                        "--no-progress"])
    result = eval_amber.main(["--annotations", str(amber_dir / "annotations.json"), "--queries",
                              str(amber_dir / "query" / "query_all.json"), "--answers", str(answers)])
    assert result["generative"]["n"] == 3 and result["discriminative"]["overall"]["n"] == 11
    assert result["missing"] == 0 and 0.0 <= result["amber_score"] <= 1.0


# ------------------------------------------------------------------------------------ during training: AmberTask
def test_amber_task_metrics_by_hand(amber_dir, lexicon):
    from vlalign.amber_task import AmberTask

    task = AmberTask(str(amber_dir / "annotations.json"), str(amber_dir / "query" / "query_all.json"), "images")
    task.setup(None)
    assert [it["id"] for it in task.descriptions] == [1, 2, 3] and len(task.questions) == 11
    items = score_answers(index_annotations(ANNOTATIONS), RESPONSES, lexicon)
    results = [{"index": i, "answer": RESPONSES[it["id"]], **it} for i, it in enumerate(items)]
    m = task.metrics(results)
    assert m["amber/chair"] == pytest.approx(4 / 11) and m["amber/cog"] == pytest.approx(2 / 5)
    assert m["amber/overall/f1"] == pytest.approx(8 / 11) and m["amber/existence/recall"] == pytest.approx(1 / 2)
    assert m["amber/amber_score"] == pytest.approx(15 / 22)
    assert len(m) == 4 + 7 * 4 + 1
    rows = task.samples(results, 3)  # two descriptions, one question
    assert [r["id"] for r in rows] == ["1", "2", "4"] and rows[2] == {
        "id": "4", "question": "Is there a dog in this image?", "answer": "No, there is not.", "truth": "no"}
    assert rows[0]["truth"] == "truth: person, dog, grass (hallucinated: frisbee)"


def test_amber_task_in_a_real_fit(amber_dir, tmp_path, make_backbone, shapes_dir):
    """The Evaluate callback runs AmberTask on the live LoRA policy of a tiny DPO fit on shapes shards."""
    import math

    import lightning as L
    from PIL import Image

    from vlalign.amber_task import AmberTask
    from vlalign.backbone import BackboneConfig, LoraSpec
    from vlalign.data.module import ShardDataModule
    from vlalign.dpo import DPOModule
    from vlalign.evaluation import Evaluate
    from vlalign.optim import OptimConfig

    base = str(tmp_path / "base")
    make_backbone().export_merged(base)
    images = tmp_path / "image"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue"], 1):
        Image.new("RGB", (32, 32), colour).save(images / f"AMBER_{i}.jpg")
    task = AmberTask(str(amber_dir / "annotations.json"), str(amber_dir / "query" / "query_all.json"), str(images),
                     limit=4, seed=0, batch_size=4, max_new_tokens=6, max_new_tokens_yes_no=2)
    ev = Evaluate([task], every_n_validations=1, at_fit_end=False, samples=3, plot=False)
    L.seed_everything(0)
    module = DPOModule(BackboneConfig(checkpoint=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), train_vision=False,
                                      train_projector=False), OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0))
    dm = ShardDataModule(train=f"{shapes_dir}/preference/train-*.tar", val=f"{shapes_dir}/preference/val-*.tar",
                         shapes_dir=shapes_dir, batch_size=2, val_batch_size=2, num_workers=0, max_length=256)
    L.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, accelerator="cpu", logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, callbacks=[ev]).fit(module, dm)
    assert [step for step, _ in ev.history] == [2]
    scalars = ev.history[0][1]
    # 3 descriptions (limit 4 > 3) and 4 of the 11 questions drawn with seed 0
    assert {"eval/amber/chair", "eval/amber/hal", "eval/amber/overall/f1", "eval/amber/amber_score"} <= set(scalars)
    assert all(math.isfinite(v) for v in scalars.values())
    assert len(task.descriptions) == 3 and len(task.questions) == 4
