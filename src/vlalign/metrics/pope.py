"""POPE metrics: SeVa's yes/no answer parsing and binary metrics with "yes" as the positive class.

POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023,
https://github.com/RUCAIBox/POPE) asks "Is there a <object> in the image?", half of the questions with answer
yes. These are the pure functions behind ``eval/pope.py`` (files, tables, plots, CLI) and the training-time
``evaluation.PopeTask``: one implementation of the parsing and the metrics.

    labels = ["yes", "yes", "no", "no"]
    preds = [parse_answer(t) for t in ["Yes, there is.", "No.", "There is no star.", "Yes."]]
    pope_metrics(labels, preds)   # accuracy 0.5, precision 0.5, recall 0.5, f1 0.5, yes_ratio 0.5, tp 1 ...
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

RATES = ("accuracy", "precision", "recall", "f1", "yes_ratio")
COUNTS = ("tp", "fp", "tn", "fn", "missing", "n")

_WORD = re.compile(r"[A-Za-z]+")


def parse_answer(text: str) -> str:
    """Map a free-form answer to ``"yes"`` or ``"no"`` with SeVa's rule.

    Keep the first sentence (everything before the first ``.``); it is ``"no"`` when its words contain
    ``No``, ``not`` or ``no`` (case-sensitive whole words), else ``"yes"``.

    Words are runs of ASCII letters. The seed code drops commas and splits on spaces, so it misses
    ``"no!"`` or ``"no\\n"``; this one counts them, and otherwise agrees. Kept quirks of the seed rule:
    ``"Nothing."``, ``"NO"``, ``"Not really."`` and the empty string all parse as ``"yes"``, and
    ``"don't"`` is ``don`` + ``t``, not ``not``.
    """
    words = set(_WORD.findall(text.split(".", 1)[0]))
    return "no" if words & {"No", "not", "no"} else "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_metrics(labels: Sequence[str], preds: Sequence[str | None]) -> dict:
    """Binary metrics with "yes" as the positive class.

    Args:
        labels: ground truth, each ``"yes"`` or ``"no"``.
        preds: parsed answers, ``"yes"``, ``"no"`` or ``None`` (unanswered), aligned with ``labels``.

    Returns:
        ``accuracy = (tp + tn) / n``, ``precision = tp / (tp + fp)``, ``recall = tp / #(label yes)``,
        ``f1 = 2 p r / (p + r)``, ``yes_ratio = #(answered yes) / n``, and the counts ``tp, fp, tn, fn,
        missing, n``. A zero denominator gives 0.0 (e.g. precision when the model never says yes, f1 when
        p + r = 0). With nothing unanswered, ``#(label yes) = tp + fn`` as usual.
    """
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    c = dict.fromkeys(COUNTS, 0)
    pos = 0
    for label, pred in zip(labels, preds):
        pos += label == "yes"
        if pred is None:
            c["missing"] += 1
        elif pred == "yes":
            c["tp" if label == "yes" else "fp"] += 1
        else:
            c["fn" if label == "yes" else "tn"] += 1
    n = c["n"] = len(labels)
    precision, recall = _ratio(c["tp"], c["tp"] + c["fp"]), _ratio(c["tp"], pos)
    return {
        "accuracy": _ratio(c["tp"] + c["tn"], n),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(c["tp"] + c["fp"], n),
        **c,
    }


def row_name(path: str) -> str:
    """Row name for a question file: its stem after the last ``pope_`` if it has one, else the whole stem.

    ``coco_pope_adversarial.json`` -> ``adversarial``; ``pope_random.jsonl`` -> ``random``;
    ``my_questions.jsonl`` -> ``my_questions``.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.rsplit("pope_", 1)[1] if "pope_" in stem and not stem.endswith("pope_") else stem



def score_questions(questions: Sequence[dict], answers: Mapping[str, str], source: str = "questions",
                    answers_source: str = "answers", allow_missing: bool = False) -> list[dict]:
    """Per-question results ``{"question_id", "label", "pred", "correct"}``, in question order.

    ``pred`` is the parsed answer (``None`` when unanswered, only with ``allow_missing``); ``correct`` is
    ``pred == label``. ``source`` / ``answers_source`` name the files in error messages.

    Raises:
        ValueError: a label that is not yes/no, or a question with no answer (unless ``allow_missing``).
    """
    items = []
    for q in questions:
        qid, label = str(q["question_id"]), str(q["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{source}: question_id {qid} has label {q['label']!r}, expected yes or no")
        if qid in answers:
            pred = parse_answer(answers[qid])
        elif allow_missing:
            pred = None
        else:
            raise ValueError(f"question_id {qid} of {source} has no answer in {answers_source} "
                             "(--allow-missing counts it as unanswered)")
        items.append({"question_id": q["question_id"], "label": label, "pred": pred, "correct": pred == label})
    return items


def summarise(results: Mapping[str, Sequence[dict]]) -> dict[str, dict]:
    """Row name -> :func:`pope_metrics`, plus ``"average"`` when there are several rows.

    The average row is the unweighted mean of the rates over rows and the sum of the counts.
    """
    rows = {name: pope_metrics([it["label"] for it in items], [it["pred"] for it in items])
            for name, items in results.items()}
    if len(rows) > 1:
        avg = {k: sum(r[k] for r in rows.values()) / len(rows) for k in RATES}
        avg.update({k: sum(r[k] for r in rows.values()) for k in COUNTS})
        rows["average"] = avg
    return rows
