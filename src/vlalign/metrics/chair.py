"""CHAIR metrics: object mentions in captions against ground-truth object lists (CHAIRs, CHAIRi, recall).

CHAIR (Rohrbach et al., "Object Hallucination in Image Captioning", EMNLP 2018,
https://github.com/LisaAnne/Hallucination) finds the object words of a vocabulary in a caption, maps each to
its canonical object, and calls a mention hallucinated when that object is not in the image's ground truth:

    CHAIRs = #(captions with at least one hallucinated object) / #captions
    CHAIRi = #(hallucinated object mentions) / #(object mentions)

These are the pure functions behind ``eval/chair.py`` (files, table, CLI; its docstring says how matching differs
from the original code) and the training-time ``evaluation.ChairTask``: one implementation of the matching and
the metrics.

    details = score_captions([{"image_id": "1", "text": "A dog and a cat."}], {"dog": ["puppy"], "cat": []},
                             {"1": ["dog"]})
    chair_metrics(details)        # chair_s 1.0, chair_i 0.5, recall 1.0, ...
"""

from __future__ import annotations

import re
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


def score_captions(captions: Sequence[dict], synonyms: Mapping[str, Sequence[str]],
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
