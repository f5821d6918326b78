"""POPE: SeVa-style answer parsing, metrics against hand-counted confusion matrices, files and the CLI."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "eval"))

import pytest  # noqa: E402

from pope import evaluate, main  # noqa: E402

from vlalign.metrics.pope import parse_answer, pope_metrics, row_name, summarise  # noqa: E402


@pytest.mark.parametrize("text, parsed", [
    ("No, there is not.", "no"),
    ("Yes.", "yes"),
    ("There is no cat.", "no"),
    ("Nothing.", "yes"),  # 'Nothing' is not the word 'no'
    ("I do not see one. No wait", "no"),
    ("Yes, there is a cat. It is not black.", "yes"),  # only the first sentence counts
    ("Yes there is one. No", "yes"),
    ("No", "no"),
    ("no!", "no"),
    ("NO", "yes"),  # the seed rule is case-sensitive: only 'No', 'no', 'not'
    ("Not really.", "yes"),
    ("", "yes"),
])
def test_parse_answer_follows_seva(text, parsed):
    assert parse_answer(text) == parsed


LABELS = ["yes"] * 5 + ["no"] * 5


def test_metrics_by_hand():
    # yes-labelled: 3 said yes (tp), 2 said no (fn); no-labelled: 1 said yes (fp), 4 said no (tn)
    preds = ["yes", "yes", "yes", "no", "no"] + ["yes", "no", "no", "no", "no"]
    m = pope_metrics(LABELS, preds)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"], m["missing"]) == (3, 1, 4, 2, 10, 0)
    assert m["accuracy"] == pytest.approx((3 + 4) / 10)
    assert m["precision"] == pytest.approx(3 / (3 + 1))
    assert m["recall"] == pytest.approx(3 / (3 + 2))
    # f1 = 2 * 0.75 * 0.6 / (0.75 + 0.6) = 0.9 / 1.35 = 2/3
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx((3 + 1) / 10)


def test_all_yes_and_all_no():
    m = pope_metrics(LABELS, ["yes"] * 10)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (5, 5, 0, 0)
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 1.0 and m["yes_ratio"] == 1.0
    assert m["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # 2/3
    m = pope_metrics(LABELS, ["no"] * 10)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 0, 5, 5)
    # precision 0/0 and f1 with p + r = 0 are defined as 0.0
    assert m["accuracy"] == 0.5 and m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0
    assert m["yes_ratio"] == 0.0
    # no yes-labelled question: recall 0/0 -> 0.0
    assert pope_metrics(["no", "no"], ["no", "no"])["recall"] == 0.0


def test_unanswered_counts_in_n_only():
    m = pope_metrics(["yes", "yes", "no", "no"], ["yes", None, "no", None])
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["missing"], m["n"]) == (1, 0, 1, 0, 2, 4)
    assert m["accuracy"] == 0.5 and m["recall"] == 0.5 and m["precision"] == 1.0 and m["yes_ratio"] == 0.25


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def questions(start, labels):
    return [{"question_id": start + i, "image": f"COCO_val2014_{i:012d}.jpg",
             "text": "Is there a dog in the image?", "label": lab} for i, lab in enumerate(labels)]


@pytest.fixture
def pope_files(tmp_path):
    """Three question files with unique ids across them and one answers file covering all."""
    yes_no = ["Yes, there is.", "No, there is not."]
    q = {"random": questions(0, LABELS), "popular": questions(100, LABELS), "adversarial": questions(200, LABELS)}
    answers = (
        [{"question_id": it["question_id"], "text": yes_no[it["label"] == "no"]} for it in q["random"]]  # perfect
        + [{"question_id": it["question_id"], "text": "Yes."} for it in q["popular"]]  # all yes
        + [{"question_id": it["question_id"], "text": "There is no dog."} for it in q["adversarial"]]  # all no
    )
    qpaths = [write_jsonl(tmp_path / f"coco_pope_{k}.json", v) for k, v in q.items()]
    return qpaths, write_jsonl(tmp_path / "answers.jsonl", answers)


def test_row_names():
    assert row_name("data/coco_pope_adversarial.json") == "adversarial"
    assert row_name("pope_random.jsonl") == "random"
    assert row_name("questions.jsonl") == "questions"


def test_several_files_give_one_row_each(pope_files):
    qpaths, apath = pope_files
    rows = summarise(evaluate(qpaths, [apath]))
    assert list(rows) == ["random", "popular", "adversarial", "average"]
    assert rows["random"]["accuracy"] == 1.0 and rows["random"]["f1"] == 1.0
    assert rows["popular"]["yes_ratio"] == 1.0 and rows["adversarial"]["yes_ratio"] == 0.0
    # average: mean of the rates, sum of the counts
    assert rows["average"]["accuracy"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert rows["average"]["f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert rows["average"]["n"] == 30 and rows["average"]["tp"] == 5 + 5 + 0


def test_one_answers_file_per_question_file(tmp_path):
    # the official files restart ids at 0, so each gets its own answers file
    q1 = write_jsonl(tmp_path / "coco_pope_random.json", questions(0, ["yes", "no"]))
    q2 = write_jsonl(tmp_path / "coco_pope_popular.json", questions(0, ["no", "no"]))
    a1 = write_jsonl(tmp_path / "a1.jsonl", [{"question_id": 0, "text": "Yes"}, {"question_id": 1, "text": "No"}])
    a2 = write_jsonl(tmp_path / "a2.jsonl", [{"question_id": 0, "text": "Yes"}, {"question_id": "1", "text": "no"}])
    rows = summarise(evaluate([q1, q2], [a1, a2]))
    assert rows["random"]["accuracy"] == 1.0 and rows["popular"]["accuracy"] == 0.5
    # one file with clashing ids and different answers is refused, not silently merged
    both = write_jsonl(tmp_path / "both.jsonl", [*map(json.loads, open(a1)), {"question_id": 0, "text": "No"}])
    with pytest.raises(ValueError, match="two different answers"):
        evaluate([q1, q2], [both])


def test_missing_answer_is_an_error_unless_allowed(tmp_path):
    q = write_jsonl(tmp_path / "coco_pope_random.json", questions(0, ["yes", "no", "yes"]))
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "text": "Yes"}, {"question_id": 1, "text": "No"}])
    with pytest.raises(ValueError, match=r"question_id 2 of .*coco_pope_random.json has no answer"):
        evaluate([q], [a])
    m = summarise(evaluate([q], [a], allow_missing=True))["random"]
    assert m["missing"] == 1 and m["n"] == 3 and m["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(SystemExit):
        main(["--questions", q, "--answers", a])


def test_cli_writes_json_and_png(pope_files, tmp_path, capsys):
    qpaths, apath = pope_files
    out, png = tmp_path / "m.json", tmp_path / "pope.png"
    main(["--questions", *qpaths, "--answers", apath, "--out", str(out), "--plot", str(png)])
    printed = capsys.readouterr().out
    assert "random" in printed and "average" in printed
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"random", "popular", "adversarial", "average"}
    assert set(metrics["random"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio", "tp", "fp", "tn", "fn", "n"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
