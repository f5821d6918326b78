"""CHAIR: object hallucination in image captions (CHAIRs, CHAIRi, recall) against ground-truth object lists.

    python eval/chair.py --captions captions.jsonl --vocab coco_synonyms.json --gt coco_objects.json --out chair.json

CHAIR (Rohrbach et al., "Object Hallucination in Image Captioning", EMNLP 2018,
https://github.com/LisaAnne/Hallucination) finds the object words of a vocabulary in a caption, maps each to
its canonical object, and calls a mention hallucinated when that object is not in the image's ground truth:

    CHAIRs = #(captions with at least one hallucinated object) / #captions
    CHAIRi = #(hallucinated object mentions) / #(object mentions)

SIMA reports both on COCO captions with the 80 COCO objects and their synonyms. Scoring runs on CPU in seconds.

Inputs:

* ``--captions``: JSON lines ``{"image_id", "text"}``; ``question_id`` is accepted for ``image_id`` and
  ``caption`` for ``text`` (the keys of LLaVA answer files and of the original CHAIR input).
* ``--vocab``: a JSON object ``canonical object -> [synonyms]``, e.g.
  ``{"person": ["man", "men", "woman", "people"], "traffic light": ["traffic light", "stoplight"]}``.
  The canonical name is always a synonym of itself. See :func:`build_vocab` for matching and plurals.
* ``--gt``: a JSON object ``image_id -> [canonical objects]`` (ids compared as strings).

Mentions are counted the way the original code counts them: every occurrence (``"a dog and another dog"``
is two mentions of dog, two hallucinations when there is no dog). ``--distinct`` counts each object once per
caption instead. Either way CHAIRs, ``objects_per_caption`` (distinct objects) and ``recall`` are the same.

Differences from the original: it singularises every caption word with pattern.en and has hard-coded fixes
(e.g. "toilet seat" is not a chair); here plural forms come from a rule plus the vocabulary, and such fixes
are vocabulary entries (list "toilet seat" under "toilet": the longest phrase wins).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence

# the matching and the metrics live in the package (one implementation, shared with training-time evaluation);
# they are re-exported here for the scripts that import this one (eval/stats.py, eval/demo.py)
from vlalign.metrics.chair import (Vocab, build_vocab, chair_metrics, find_objects, plural,  # noqa: F401
                                   score_caption, tokens)
from vlalign.metrics.chair import score_captions as evaluate  # noqa: F401  (this script's name for it)

def load_captions(path: str) -> list[dict]:
    """``[{"image_id": str, "text": str}]`` from JSON lines, accepting ``question_id`` / ``caption`` aliases."""
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            iid = rec.get("image_id", rec.get("question_id"))
            text = rec.get("text", rec.get("caption"))
            if iid is None or text is None:
                raise ValueError(f"{path}:{lineno}: need image_id (or question_id) and text (or caption)")
            out.append({"image_id": str(iid), "text": text})
    return out


def format_table(metrics: Mapping[str, float]) -> str:
    """One-row plain-text table; CHAIR and recall in percent."""
    pct = ("chair_s", "chair_i", "recall")
    cols = [*pct, "objects_per_caption", "words_per_caption", "n"]
    cells = [f"{100 * metrics[c]:.2f}" for c in pct]
    cells += [f"{metrics['objects_per_caption']:.2f}", f"{metrics['words_per_caption']:.1f}", str(metrics["n"])]
    widths = [max(len(c), len(v)) + 2 for c, v in zip(cols, cells)]
    return "\n".join("".join(f"{x:>{w}}" for x, w in zip(row, widths)) for row in (cols, cells))


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--captions", required=True, help="JSON lines {image_id, text} (or question_id, caption)")
    p.add_argument("--vocab", required=True, help="JSON object: canonical object -> list of synonyms")
    p.add_argument("--gt", required=True, help="JSON object: image_id -> list of ground-truth canonical objects")
    p.add_argument("--distinct", action="store_true",
                   help="CHAIRi counts each object once per caption instead of every mention")
    p.add_argument("--no-plurals", action="store_true", help="match only the forms listed in --vocab")
    p.add_argument("--out", help="write the metrics as JSON here")
    args = p.parse_args(argv)

    with open(args.vocab) as f:
        synonyms = json.load(f)
    with open(args.gt) as f:
        gt = json.load(f)
    try:
        details = evaluate(load_captions(args.captions), synonyms, gt, plurals=not args.no_plurals)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    metrics = chair_metrics(details, distinct=args.distinct)
    print(format_table(metrics))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
