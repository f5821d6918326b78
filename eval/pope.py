"""POPE: yes/no object-probing accuracy, precision, recall, F1 and yes-ratio from a model's answers.

    python eval/pope.py --questions coco_pope_random.json coco_pope_popular.json coco_pope_adversarial.json \
        --answers answers.jsonl --out pope.json --plot pope.png

POPE (Li et al., "Evaluating Object Hallucination in Large Vision-Language Models", EMNLP 2023,
https://github.com/RUCAIBox/POPE) asks "Is there a <object> in the image?" about COCO val2014 images,
half of them with answer yes. Scoring runs on CPU in seconds; generating the answers is a separate step.

Inputs (JSON lines; the official ``coco_pope_*.json`` files are JSON lines despite the extension):

* ``--questions``: one or more POPE question files, records ``{"question_id", "image", "text", "label"}``
  with ``label`` in ``yes`` / ``no``. Each file gives one row, named by :func:`row_name`
  (``coco_pope_random.json`` -> ``random``).
* ``--answers``: records ``{"question_id", "text"}`` (``"answer"`` is accepted for ``"text"``), matched to the
  questions by ``question_id`` (compared as strings, so ``3`` matches ``"3"``). Give one file covering every
  question file (question ids must then be unique across them, as in LLaVA's ``llava_pope_test.jsonl``), or
  one file per question file, in the same order (needed for the official files, whose ids restart at 1).

A question with no answer is an error unless ``--allow-missing``: it is then *unanswered*, counted in ``n``
(so it lowers accuracy, and recall when its label is yes) but in none of tp/fp/tn/fn, and ``missing`` says
how many there were.

Parsing follows SeVa / LLaVA-1.5 ``eval_pope.py`` and metrics treat "yes" as the positive class: see
``vlalign.metrics.pope`` (``parse_answer``, ``pope_metrics``), which this script wraps with files, a table and a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence

# the parsing and the metrics live in the package (one implementation, shared with training-time evaluation);
# they are re-exported here for the scripts that import this one (eval/stats.py, eval/demo.py)
from vlalign.metrics.pope import (COUNTS, RATES, parse_answer, pope_metrics, row_name,  # noqa: F401
                                  score_questions, summarise)

def load_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_answers(path: str) -> dict[str, str]:
    """``question_id`` (as a string) -> answer text; a repeated id with a different answer is an error."""
    answers: dict[str, str] = {}
    for rec in load_jsonl(path):
        qid = str(rec["question_id"])
        text = rec["text"] if "text" in rec else rec["answer"]
        if answers.get(qid, text) != text:
            raise ValueError(
                f"{path}: question_id {qid} has two different answers; if it covers several POPE files whose "
                "ids overlap, pass one answers file per question file"
            )
        answers[qid] = text
    return answers


def evaluate(question_paths: Sequence[str], answer_paths: Sequence[str],
             allow_missing: bool = False) -> dict[str, list[dict]]:
    """Row name -> per-question results (:func:`score_questions`) for each question file.

    ``answer_paths`` holds one file for all question files, or one per question file in the same order.
    """
    if len(answer_paths) not in (1, len(question_paths)):
        raise ValueError(f"give one answers file, or one per question file ({len(question_paths)}), "
                         f"not {len(answer_paths)}")
    names = [row_name(p) for p in question_paths]
    if len(set(names)) < len(names):
        names = [os.path.splitext(os.path.basename(p))[0] for p in question_paths]
        if len(set(names)) < len(names):
            raise ValueError(f"question files need distinct names, got {list(question_paths)}")
    loaded = {p: load_answers(p) for p in dict.fromkeys(answer_paths)}
    pairs = zip(question_paths, answer_paths if len(answer_paths) > 1 else list(answer_paths) * len(names))
    return {name: score_questions(load_jsonl(q), loaded[a], q, a, allow_missing)
            for name, (q, a) in zip(names, pairs)}


def format_table(rows: Mapping[str, dict]) -> str:
    """Plain-text table: rates in percent, then n (and missing when any answer was missing)."""
    show_missing = any(r["missing"] for r in rows.values())
    cols = [*RATES, "n"] + (["missing"] if show_missing else [])
    width = max(12, *(len(name) for name in rows))
    lines = [f"{'split (%)':<{width}}" + "".join(f"{c:>11}" for c in cols)]
    for name, r in rows.items():
        cells = [f"{100 * r[c]:>11.2f}" for c in RATES] + [f"{r[c]:>11d}" for c in cols[len(RATES):]]
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def plot(rows: Mapping[str, dict], path: str) -> None:
    """Grouped bar chart (accuracy, F1, yes-ratio in percent) per row, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, keys = list(rows), ("accuracy", "f1", "yes_ratio")
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 1), 3.5))
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [100 * rows[n][key] for n in names], width, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 122)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("%")
    ax.set_title("POPE")
    ax.axhline(50, color="grey", lw=0.5, ls="--")  # chance accuracy and the balanced yes-ratio
    ax.legend(loc="upper center", ncol=len(keys), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--questions", nargs="+", required=True,
                   help="POPE question files (JSON lines with question_id, label); one table row each")
    p.add_argument("--answers", nargs="+", required=True,
                   help="answers (JSON lines with question_id, text): one file for all, or one per question file")
    p.add_argument("--allow-missing", action="store_true",
                   help="count questions without an answer as unanswered instead of failing")
    p.add_argument("--out", help="write the metrics as JSON here: {row: {accuracy, ..., n}}")
    p.add_argument("--plot", help="write a bar chart PNG here")
    args = p.parse_args(argv)

    try:
        rows = summarise(evaluate(args.questions, args.answers, args.allow_missing))
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
