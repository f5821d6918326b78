"""Paired bootstrap: degenerate cases exactly, coverage and width on simulated data, per-item helpers, CLI."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import chair  # noqa: E402
import pope  # noqa: E402
from stats import (  # noqa: E402
    chair_hallucinated, chair_objects, format_comparison, main, paired_bootstrap, paired_values, pope_correct,
    pope_said_yes,
)


def test_identical_before_and_after():
    x = np.random.default_rng(1).random(50)
    r = paired_bootstrap(x, x)
    assert r["diff"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["n"] == 50 and r["mean_before"] == r["mean_after"] == pytest.approx(x.mean())


def test_constant_shift():
    x = np.random.default_rng(2).random(40)
    r = paired_bootstrap(x, x + 0.25, n_boot=500)
    # every resample's mean difference is 0.25 too, so the interval collapses onto it
    assert r["diff"] == pytest.approx(0.25)
    assert r["ci_low"] == pytest.approx(0.25) and r["ci_high"] == pytest.approx(0.25)


def test_interval_covers_truth_has_normal_width_and_is_seeded():
    rng = np.random.default_rng(3)
    n = 3000
    before = (rng.random(n) < 0.80).astype(float)  # accuracy 0.80 -> 0.85 on the same items
    after = np.where(rng.random(n) < 0.5, before, (rng.random(n) < 0.85).astype(float))
    true_diff = 0.5 * (0.85 - 0.80)
    r = paired_bootstrap(before, after, n_boot=2000, seed=7)
    assert r["ci_low"] < true_diff < r["ci_high"]
    assert r["ci_low"] < r["diff"] < r["ci_high"]
    # the half-width matches the normal approximation 1.96 * sd(d) / sqrt(n)
    d = after - before
    assert (r["ci_high"] - r["ci_low"]) / 2 == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(n), rel=0.15)
    assert paired_bootstrap(before, after, n_boot=2000, seed=7) == r
    assert paired_bootstrap(before, after, n_boot=2000, seed=8) != r
    narrow = paired_bootstrap(before, after, n_boot=2000, seed=7, ci=0.5)
    assert r["ci_low"] < narrow["ci_low"] < narrow["ci_high"] < r["ci_high"]


def test_bad_inputs():
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="1 only before"):
        paired_values({"a": 1, "b": 2}, {"a": 1})


def test_per_item_helpers_and_table(tmp_path):
    q = tmp_path / "coco_pope_random.json"
    q.write_text("".join(json.dumps({"question_id": i, "label": lab}) + "\n"
                         for i, lab in enumerate(["yes", "no", "yes", "no"])))
    answers = {"0": "Yes", "1": "Yes", "2": "No", "3": "No"}
    results = {"random": pope.score_questions(pope.load_jsonl(str(q)), answers)}
    assert pope_correct(results) == {"random/0": 1.0, "random/1": 0.0, "random/2": 0.0, "random/3": 1.0}
    assert pope_said_yes(results) == {"random/0": 1.0, "random/1": 1.0, "random/2": 0.0, "random/3": 0.0}

    synonyms, gt = {"dog": [], "cat": []}, {"1": ["dog"], "2": ["cat"]}
    caps = [{"image_id": 1, "text": "A dog and a cat."}, {"image_id": 2, "text": "A cat."},
            {"image_id": 2, "text": "Nothing."}]
    details = chair.evaluate(caps, synonyms, gt)
    assert chair_hallucinated(details) == {"1": 1.0, "2": 0.0, "2#1": 0.0}
    assert chair_objects(details) == {"1": 2.0, "2": 1.0, "2#1": 0.0}

    r = paired_bootstrap([0, 0, 1, 1], [1, 0, 1, 1], n_boot=200)
    table = format_comparison({"accuracy": r}, scale={"accuracy": 100})
    assert table.splitlines()[0] == "| metric | before | after | diff | 95% CI | n |"
    assert table.splitlines()[2].startswith("| accuracy | 50.00 | 75.00 | +25.00 | [")


def test_cli_pope_and_chair(tmp_path, capsys):
    labels = ["yes", "no"] * 20
    q = tmp_path / "coco_pope_random.json"
    q.write_text("".join(json.dumps({"question_id": i, "label": lab}) + "\n" for i, lab in enumerate(labels)))
    before, after = tmp_path / "before.jsonl", tmp_path / "after.jsonl"
    before.write_text("".join(json.dumps({"question_id": i, "text": "Yes"}) + "\n" for i in range(40)))
    after.write_text("".join(json.dumps({"question_id": i, "text": lab.title()}) + "\n"
                             for i, lab in enumerate(labels)))
    out = tmp_path / "s.json"
    res = main(["pope", "--questions", str(q), "--before", str(before), "--after", str(after), "--out", str(out)])
    assert res["random/accuracy"]["diff"] == pytest.approx(0.5)  # 0.5 -> 1.0
    assert res["random/yes_ratio"]["diff"] == pytest.approx(-0.5)  # 1.0 -> 0.5
    assert json.loads(out.read_text()) == res
    assert "random/accuracy" in capsys.readouterr().out

    vocab, gt = tmp_path / "v.json", tmp_path / "gt.json"
    vocab.write_text(json.dumps({"dog": [], "cat": []}))
    gt.write_text(json.dumps({str(i): ["dog"] for i in range(10)}))
    cb, ca = tmp_path / "cb.jsonl", tmp_path / "ca.jsonl"
    cb.write_text("".join(json.dumps({"image_id": i, "text": "A dog and a cat."}) + "\n" for i in range(10)))
    ca.write_text("".join(json.dumps({"image_id": i, "text": "A dog."}) + "\n" for i in range(10)))
    res = main(["chair", "--vocab", str(vocab), "--gt", str(gt), "--before", str(cb), "--after", str(ca)])
    assert res["chair_s"]["diff"] == -1.0 and res["objects_per_caption"]["diff"] == -1.0
