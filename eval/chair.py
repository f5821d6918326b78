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
import re
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

_WORD = re.compile(r"[a-z]+")


def tokens(text: str) -> list[str]:
    """Lower-cased runs of letters: ``"Hot-dogs, a man's hat"`` -> ``hot dogs a man s hat``."""
    return _WORD.findall(text.lower())


def plural(word: str) -> str:
    """English plural by rule: -es after s/x/z/ch/sh, consonant + y -> ies, else -s.

    Irregular plurals (men, women, people, children, mice, knives, sheep, tomatoes, ...) are not derived:
    list them in the vocabulary.
    """
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


class Vocab(NamedTuple):
    """Object phrases as token tuples -> canonical object; ``max_len`` is the longest phrase in tokens."""

    phrases: dict[tuple[str, ...], str]
    max_len: int


def build_vocab(synonyms: Mapping[str, Sequence[str]], plurals: bool = True) -> Vocab:
    """Phrase table from ``canonical -> [synonyms]``.

    Every synonym and every canonical name is tokenised with :func:`tokens`, so matching is on whole words,
    case-insensitive, and multi-word phrases (``"traffic light"``) match across any non-letters. With
    ``plurals``, the :func:`plural` of a phrase's last word also matches (``"traffic lights"``), unless that
    form is itself listed: listed phrases win. A phrase listed under two canonical objects is an error.
    """
    listed: dict[tuple[str, ...], str] = {}
    for canonical, words in synonyms.items():
        for word in [canonical, *words]:
            key = tuple(tokens(word))
            if not key:
                continue
            if listed.setdefault(key, canonical) != canonical:
                raise ValueError(f"{word!r} is listed under both {listed[key]!r} and {canonical!r}")
    phrases = dict(listed)
    if plurals:
        for key, canonical in listed.items():
            phrases.setdefault(key[:-1] + (plural(key[-1]),), canonical)
    return Vocab(phrases, max(map(len, phrases), default=0))


def find_objects(text: str, vocab: Vocab) -> list[tuple[str, str]]:
    """Object mentions ``(matched phrase, canonical)`` in reading order, longest phrase first at each word.

    A matched phrase consumes its words: "teddy bear" is one mention of teddy bear, not also one of bear.
    """
    words, found, i = tokens(text), [], 0
    while i < len(words):
        for n in range(min(vocab.max_len, len(words) - i), 0, -1):
            canonical = vocab.phrases.get(tuple(words[i:i + n]))
            if canonical is not None:
                found.append((" ".join(words[i:i + n]), canonical))
                i += n
                break
        else:
            i += 1
    return found


def score_caption(text: str, gt_objects: Sequence[str], vocab: Vocab) -> dict:
    """Per-caption details.

    Returns ``mentions`` (every ``(phrase, canonical)``), ``mentioned`` (distinct canonical objects, in order
    of first mention), ``hallucinated`` (distinct mentioned objects not in ``gt_objects``),
    ``hallucinated_mentions`` (mentions of those, with repeats), ``recalled`` (ground-truth objects
    mentioned), ``n_gt`` (distinct ground-truth objects) and ``n_words`` (whitespace-separated words).
    """
    gt = set(gt_objects)
    mentions = find_objects(text, vocab)
    mentioned = list(dict.fromkeys(c for _, c in mentions))
    return {
        "mentions": mentions,
        "mentioned": mentioned,
        "hallucinated": [c for c in mentioned if c not in gt],
        "hallucinated_mentions": sum(c not in gt for _, c in mentions),
        "recalled": [c for c in mentioned if c in gt],
        "n_gt": len(gt),
        "n_words": len(text.split()),
    }


def chair_metrics(details: Sequence[dict], distinct: bool = False) -> dict:
    """Corpus CHAIR from :func:`score_caption` details.

    Returns ``chair_s``, ``chair_i``, ``objects_per_caption`` (mean distinct objects), ``words_per_caption``,
    ``recall`` (ground-truth objects mentioned / ground-truth objects, pooled over captions) and ``n``.
    ``chair_i`` counts every mention (the original), or each object once per caption with ``distinct``.
    Zero denominators give 0.0.
    """
    n = len(details)
    if distinct:
        hall, total = (sum(len(d[k]) for d in details) for k in ("hallucinated", "mentioned"))
    else:
        hall = sum(d["hallucinated_mentions"] for d in details)
        total = sum(len(d["mentions"]) for d in details)
    return {
        "chair_s": _ratio(sum(bool(d["hallucinated"]) for d in details), n),
        "chair_i": _ratio(hall, total),
        "objects_per_caption": _ratio(sum(len(d["mentioned"]) for d in details), n),
        "words_per_caption": _ratio(sum(d["n_words"] for d in details), n),
        "recall": _ratio(sum(len(d["recalled"]) for d in details), sum(d["n_gt"] for d in details)),
        "n": n,
    }


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


def evaluate(captions: Sequence[dict], synonyms: Mapping[str, Sequence[str]],
             gt: Mapping[str, Sequence[str]], plurals: bool = True) -> list[dict]:
    """:func:`score_caption` for each caption, each with its ``image_id`` and ``text`` added.

    Every caption's image must be in ``gt`` (keys compared as strings).
    """
    vocab = build_vocab(synonyms, plurals)
    gt = {str(k): v for k, v in gt.items()}
    out = []
    for cap in captions:
        iid = str(cap["image_id"])
        if iid not in gt:
            raise ValueError(f"image_id {iid} has a caption but no ground-truth objects")
        out.append({"image_id": iid, "text": cap["text"], **score_caption(cap["text"], gt[iid], vocab)})
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
