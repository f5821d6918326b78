"""CHAIR: object matching (synonyms, plurals, multi-word phrases) and CHAIRs / CHAIRi worked out by hand."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval"))

import pytest  # noqa: E402

from chair import evaluate, load_captions, main  # noqa: E402

from vlalign.metrics.chair import build_vocab, chair_metrics, find_objects, plural, score_captions  # noqa: E402

SYNONYMS = {
    "person": ["man", "men", "woman", "women", "people"],
    "dog": ["puppy"],
    "cat": ["kitten"],
    "bus": [],
    "traffic light": ["stoplight"],
    "teddy bear": [],
    "bear": [],
    "car": [],
}
GT = {"1": ["dog", "person"], "2": ["bus", "traffic light"], "3": ["cat"], "4": ["teddy bear"], "5": ["car"]}
CAPTIONS = [
    {"image_id": 1, "text": "Two men walk their puppies past a dog."},  # person, dog, dog: none hallucinated
    {"image_id": 2, "text": "A bus stops at the traffic lights near a cat."},  # bus, traffic light, cat*
    {"image_id": 3, "text": "A kitten sleeps next to a dog and a dog bowl."},  # cat, dog*, dog*
    {"image_id": 4, "text": "A teddy bear on a bed."},  # teddy bear (not bear)
    {"image_id": 5, "text": "An empty street."},  # nothing
]


def test_plural_rule():
    assert [plural(w) for w in ["dog", "bus", "box", "couch", "puppy", "toy", "light"]] == \
        ["dogs", "buses", "boxes", "couches", "puppies", "toys", "lights"]


def test_matching_synonyms_plurals_and_longest_phrase():
    vocab = build_vocab(SYNONYMS)
    found = find_objects("Buses, Traffic-Lights and a TEDDY BEAR; a bear with two puppies.", vocab)
    assert found == [("buses", "bus"), ("traffic lights", "traffic light"), ("teddy bear", "teddy bear"),
                     ("bear", "bear"), ("puppies", "dog")]
    # whole words only: no 'cat' in 'category', no 'man' in 'many' or 'woman'
    assert find_objects("Many categories of woman", vocab) == [("woman", "person")]
    # without the plural rule only listed forms match
    assert find_objects("two dogs and two men", build_vocab(SYNONYMS, plurals=False)) == [("men", "person")]


def test_ambiguous_vocab_is_refused():
    with pytest.raises(ValueError, match="listed under both"):
        build_vocab({"dog": ["pup"], "seal": ["pup"]})


def test_chair_by_hand():
    details = score_captions(CAPTIONS, SYNONYMS, GT)
    assert details == evaluate(CAPTIONS, SYNONYMS, GT)  # the script's name for the same function
    assert [d["mentioned"] for d in details] == [["person", "dog"], ["bus", "traffic light", "cat"],
                                                 ["cat", "dog"], ["teddy bear"], []]
    assert [d["hallucinated"] for d in details] == [[], ["cat"], ["dog"], [], []]
    assert [d["hallucinated_mentions"] for d in details] == [0, 1, 2, 0, 0]

    m = chair_metrics(details)
    assert m["n"] == 5
    assert m["chair_s"] == pytest.approx(2 / 5)  # captions 2 and 3
    # every mention: hallucinated 0+1+2+0+0 = 3 of 3+3+3+1+0 = 10
    assert m["chair_i"] == pytest.approx(3 / 10)
    assert m["objects_per_caption"] == pytest.approx((2 + 3 + 2 + 1 + 0) / 5)
    assert m["words_per_caption"] == pytest.approx((8 + 10 + 11 + 6 + 3) / 5)
    # ground truth mentioned: 2 + 2 + 1 + 1 + 0 of 2 + 2 + 1 + 1 + 1
    assert m["recall"] == pytest.approx(6 / 7)

    # each object once per caption: hallucinated 0+1+1+0+0 = 2 of 2+3+2+1+0 = 8
    m = chair_metrics(details, distinct=True)
    assert m["chair_i"] == pytest.approx(2 / 8) and m["chair_s"] == pytest.approx(2 / 5)


def test_empty_and_missing_gt():
    assert chair_metrics([])["chair_i"] == 0.0
    assert chair_metrics(evaluate([{"image_id": 5, "text": "Nothing here."}], SYNONYMS, GT))["chair_i"] == 0.0
    with pytest.raises(ValueError, match="image_id 9"):
        evaluate([{"image_id": 9, "text": "A dog."}], SYNONYMS, GT)


def test_caption_aliases_and_cli(tmp_path, capsys):
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"question_id": c["image_id"], "caption": c["text"]}) + "\n"
                            for c in CAPTIONS))
    assert load_captions(str(caps))[0] == {"image_id": "1", "text": CAPTIONS[0]["text"]}
    vocab, gt, out = tmp_path / "vocab.json", tmp_path / "gt.json", tmp_path / "chair.json"
    vocab.write_text(json.dumps(SYNONYMS))
    gt.write_text(json.dumps(GT))
    main(["--captions", str(caps), "--vocab", str(vocab), "--gt", str(gt), "--out", str(out)])
    assert "chair_s" in capsys.readouterr().out
    m = json.loads(out.read_text())
    assert m["chair_s"] == pytest.approx(0.4) and m["chair_i"] == pytest.approx(0.3) and m["n"] == 5
