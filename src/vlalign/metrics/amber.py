"""AMBER metrics: LLM-free hallucination scores for image descriptions and yes/no questions.

AMBER (Wang et al., "AMBER: An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination Evaluation",
arXiv 2311.07397, https://github.com/junyangwang0410/AMBER) annotates 1,004 images with the objects that are in
them (``truth``) and objects a model is prone to invent (``hallu``), and asks 14,216 yes/no questions about
existence, attributes (state, number, action) and relations. These are the pure functions behind
``eval/amber.py`` (CLI, table) and ``amber_task.AmberTask`` (during training), with readers for AMBER's files.

Generative task, over the descriptions (every object *mention* counts, as in the official scorer):

    CHAIR = #(hallucinated mentions) / #(mentions)
    Cover = #(truth entries mentioned) / #(truth entries)
    Hal   = #(descriptions with a hallucinated mention) / #(descriptions)
    Cog   = #(hallu entries mentioned) / #(hallu entries)

A *mention* is a word of the response that is in AMBER's object vocabulary (every key and every listed word of
``relation.json``). It is *safe* (not hallucinated) when it is a global safe word (``safe_words.txt``) or one of
the image's truth objects or a word associated with one (``relation.json[truth]``); otherwise it is
hallucinated. A safe mention covers the first truth entry it maps to, a hallucinated one the first hallu entry
(see :func:`score_description` for the order, a quirk kept from the official code).

Discriminative task, with **"no" as the positive class** (the official scorer's choice: a hallucination is
caught when the model says no to something absent):

    Accuracy  = #(correct) / #(questions)
    Precision = #(answered no and truth no) / #(answered no)
    Recall    = #(answered no and truth no) / #(truth no)
    F1        = 2 P R / (P + R)

per dimension (existence, attribute = state + number + action pooled, each of those, relation) and over all
questions. The paper's summary score combines the two tasks:

    AMBER score = (1 - CHAIR + F1_discriminative) / 2

How matching differs from the official ``inference.py`` (which needs NLTK's tagger and WordNet, and spaCy's
``en_core_web_lg`` vectors); given the same mentions, everything else is computed as it does:

1. **No part-of-speech tagging.** The official scorer keeps only words NLTK tags as nouns; here every
   vocabulary word counts, so a verb that spells an object ("a man *watches* the sea", "a child *paddles*")
   is a mention too.
2. **Singularising by rule, guided by the vocabulary, case-insensitive** (:func:`singular`), instead of
   WordNet's noun lemmatiser, which is case-sensitive (officially "Dogs" at a sentence start never matches
   ``dog``) and maps some vocabulary words away (WordNet turns "chopsticks" into "chopstick", not in the
   vocabulary; here a listed form is kept as it is).
3. **No word-vector similarity.** The official scorer also treats a mention as safe when spaCy's similarity to
   a truth or associated word exceeds 0.8 (``--similarity_score``), and credits Cog for a hallu word that
   similar. Here only equal words (after 2.) match. With the same mentions, CHAIR and Hal here are >= the
   official ones, Cover and Cog <=.
4. **Exact ratios.** The official counters start at 0.001 (to dodge a zero division), it rounds precision and
   recall to 0.1 percent before F1 and adds 1e-4 (existence: 1e-3) to F1's denominator. Here ratios are exact
   and an empty denominator gives 0.0; the difference stays below ~0.1 point at AMBER's size.
5. **Yes/no parsing** is a choice (:data:`ANSWER_RULES`): the official scorer accepts only the exact strings
   ``"Yes"`` / ``"No"`` (rule ``exact``); the default ``first_word`` reads the first word case-insensitively so
   "No, there is not." is a no. Anything unparsable counts as wrong and as not-"no", as officially.

Kept quirks of the official scorer, so that numbers stay comparable: mentions are counted with repeats; a global
safe word is never hallucinated but still counts in CHAIR's denominator and covers nothing (even when it is a
truth object); a truth list with a repeated object ("ship", "ship") can cover only the first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Callable, NamedTuple, Optional

from vlalign.metrics.pope import parse_answer as _seva_parse

GENERATIVE = "generative"
# annotation ``type`` -> (dimension, attribute kind or None); the official scorer files every other type
# (``discriminative-relation`` and the 689 plain ``relation`` ones) under relation.
QUESTION_TYPES: dict[str, tuple[str, Optional[str]]] = {
    "discriminative-hallucination": ("existence", None),
    "discriminative-attribute-state": ("attribute", "state"),
    "discriminative-attribute-number": ("attribute", "number"),
    "discriminative-attribute-action": ("attribute", "action"),
    "discriminative-relation": ("relation", None),
    "relation": ("relation", None),
}
DIMENSIONS = ("existence", "attribute", "state", "number", "action", "relation")
GENERATIVE_METRICS = ("chair", "cover", "hal", "cog")
DISCRIMINATIVE_METRICS = ("accuracy", "precision", "recall", "f1")

_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*")  # hyphenated words stay whole, as NLTK's tokenizer keeps them
# plurals no suffix rule derives; the result still has to be in the vocabulary to count
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
              "mice": "mouse", "geese": "goose", "oxen": "ox", "leaves": "leaf", "dice": "die"}


# ----------------------------------------------------------------------------------------------- the lexicon
class Lexicon(NamedTuple):
    """AMBER's word lists, lower-cased: ``association`` (``relation.json``: object -> associated words),
    ``vocab`` (every key and listed word: what counts as an object mention) and ``safe`` (``safe_words.txt``:
    words never counted as hallucinated)."""

    association: dict[str, list[str]]
    vocab: frozenset[str]
    safe: frozenset[str]


def build_lexicon(association: Mapping[str, Sequence[str]], safe_words: Iterable[str] = ()) -> Lexicon:
    """:class:`Lexicon` from ``relation.json``'s mapping and ``safe_words.txt``'s lines (blank lines dropped)."""
    assoc: dict[str, list[str]] = {}
    for word, related in association.items():
        if isinstance(related, str) or not isinstance(related, Sequence):
            raise ValueError(f"relation.json: {word!r} must map to a list of words, got {related!r}")
        assoc.setdefault(word.strip().lower(), []).extend(w.strip().lower() for w in related)
    vocab = frozenset(assoc) | frozenset(w for ws in assoc.values() for w in ws)
    return Lexicon(assoc, vocab, frozenset(w.strip().lower() for w in safe_words if w.strip()))


def read_lexicon(relation_path: str, safe_words_path: Optional[str] = None) -> Lexicon:
    """:func:`build_lexicon` from AMBER's ``data/relation.json`` and (optionally) ``data/safe_words.txt``."""
    with open(relation_path, encoding="utf-8") as f:
        association = json.load(f)
    if not isinstance(association, dict):
        raise ValueError(f"{relation_path}: expected a JSON object word -> [associated words]")
    safe: list[str] = []
    if safe_words_path:
        with open(safe_words_path, encoding="utf-8") as f:
            safe = f.read().splitlines()
    return build_lexicon(association, safe)


def read_records(path: str) -> list[dict]:
    """Records of a JSON list file (AMBER's annotations, queries and responses) or a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of JSON objects")
    return records


# ------------------------------------------------------------------------------------------- object mentions
def singular(token: str, vocab: frozenset[str]) -> Optional[str]:
    """The vocabulary word a lower-case token stands for, or None.

    In order: the token itself when listed (``bus``, ``glass``, ``people``, ``sunglasses``); else a fixed
    irregular plural (``men`` -> ``man``, ``leaves`` -> ``leaf``), counted only if listed; else the first listed
    of the suffix rules' candidates: ``-ies`` -> ``-y``; ``-ves`` -> ``-f`` / ``-fe``; ``-es`` dropped after
    s, x, z, ch, sh, o; a final ``-s`` dropped (not after ``s``). ``gloves`` -> ``glove`` (via ``-s``),
    ``knives`` -> ``knife``, ``benches`` -> ``bench``, ``cloudy`` -> None (not a plural of ``cloud``).
    """
    if token in vocab:
        return token
    if token in _IRREGULAR:
        word = _IRREGULAR[token]
        return word if word in vocab else None
    candidates = []
    if token.endswith("ies") and len(token) > 4:
        candidates.append(token[:-3] + "y")
    if token.endswith("ves"):
        candidates += [token[:-3] + "f", token[:-3] + "fe"]
    if token.endswith("es") and token[:-2].endswith(("s", "x", "z", "ch", "sh", "o")):
        candidates.append(token[:-2])
    if token.endswith("s") and not token.endswith("ss"):
        candidates.append(token[:-1])
    return next((c for c in candidates if c in vocab), None)


def extract_objects(text: str, vocab: frozenset[str]) -> list[str]:
    """Object mentions of a description in reading order, repeats kept, each as its vocabulary word.

    Tokens are lower-cased runs of letters, hyphenated words whole (``"e-book"``, ``"hot-dog"`` is not
    ``dog``), each mapped through :func:`singular`. ``"Two dogs and a man's dog."`` -> ``[dog, man, dog]``.
    """
    return [w for w in (singular(t, vocab) for t in _TOKEN.findall(text.lower())) if w is not None]


def _candidates(entries: Sequence[str], association: Mapping[str, Sequence[str]], what: str) -> list[tuple[str, int]]:
    """``(word, entry index)`` in the official lookup order: the associated words of entry 0, of entry 1, ...,
    then the entries themselves."""
    out = []
    for i, entry in enumerate(entries):
        if entry not in association:
            raise ValueError(f"{what} object {entry!r} is not a key of relation.json (the word association file)")
        out += [(w, i) for w in association[entry]]
    return out + [(entry, i) for i, entry in enumerate(entries)]


def _first_entry(word: str, candidates: Sequence[tuple[str, int]]) -> Optional[int]:
    return next((i for w, i in candidates if w == word), None)


def score_description(text: str, truth: Sequence[str], hallu: Sequence[str], lexicon: Lexicon) -> dict:
    """Per-description details for the generative metrics.

    Each mention (:func:`extract_objects`) is, in this order: a global safe word (safe, covers nothing); else
    equal to a word of the truth lookup list (safe, covers that truth entry); else hallucinated, and when equal
    to a word of the hallu lookup list it covers that hallu entry. A lookup list is the associated words of every
    entry (entry by entry) followed by the entries, and a word covers the entry of its *first* occurrence, as in
    the official code: with truth ``[person, man]`` the mention "man" is found among person's associated words
    first, so it covers ``person`` and ``man`` stays uncovered.

    Returns ``mentions`` (list of words), ``hallucinated`` (the hallucinated mentions, repeats kept),
    ``truth_covered`` / ``hallu_covered`` (one bool per entry of ``truth`` / ``hallu``).
    """
    truth = [w.strip().lower() for w in truth]
    hallu = [w.strip().lower() for w in hallu]
    safe_lookup = _candidates(truth, lexicon.association, "truth")
    hallu_lookup = _candidates(hallu, lexicon.association, "hallu")
    truth_covered, hallu_covered = [False] * len(truth), [False] * len(hallu)
    mentions = extract_objects(text, lexicon.vocab)
    hallucinated = []
    for word in mentions:
        if word in lexicon.safe:
            continue
        entry = _first_entry(word, safe_lookup)
        if entry is not None:
            truth_covered[entry] = True
            continue
        hallucinated.append(word)
        entry = _first_entry(word, hallu_lookup)
        if entry is not None:
            hallu_covered[entry] = True
    return {"mentions": mentions, "hallucinated": hallucinated, "truth_covered": truth_covered,
            "hallu_covered": hallu_covered}


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def generative_metrics(details: Sequence[dict]) -> dict:
    """CHAIR, Cover, Hal, Cog (fractions in [0, 1]) pooled over :func:`score_description` details.

    Also ``mentions``, ``hallucinated_mentions`` and ``n`` (descriptions). Zero denominators give 0.0.
    """
    mentions = sum(len(d["mentions"]) for d in details)
    hallucinated = sum(len(d["hallucinated"]) for d in details)
    return {
        "chair": _ratio(hallucinated, mentions),
        "cover": _ratio(sum(map(sum, (d["truth_covered"] for d in details))),
                        sum(len(d["truth_covered"]) for d in details)),
        "hal": _ratio(sum(bool(d["hallucinated"]) for d in details), len(details)),
        "cog": _ratio(sum(map(sum, (d["hallu_covered"] for d in details))),
                      sum(len(d["hallu_covered"]) for d in details)),
        "mentions": mentions,
        "hallucinated_mentions": hallucinated,
        "n": len(details),
    }


# ---------------------------------------------------------------------------------------------- yes/no answers
def _exact(text: str) -> Optional[str]:
    return {"Yes": "yes", "No": "no"}.get(text)


def _first_word(text: str) -> Optional[str]:
    m = re.match(r"\W*([A-Za-z]+)", text)
    word = m.group(1).lower() if m else ""
    return word if word in ("yes", "no") else None


ANSWER_RULES: dict[str, Callable[[str], Optional[str]]] = {
    "first_word": _first_word,  # "No, there is not." -> no; "There is one." -> None (unparsable)
    "exact": _exact,  # the official scorer: only "Yes" and "No" as the whole response
    "pope": _seva_parse,  # SeVa's POPE rule: "no" when the first sentence has No / no / not, else "yes"
}


def discriminative_metrics(labels: Sequence[str], preds: Sequence[Optional[str]]) -> dict:
    """Accuracy, precision, recall, F1 with **"no" as the positive class**, as AMBER's scorer defines them.

    Args:
        labels: the annotation's ``truth``, each ``"yes"`` or ``"no"``.
        preds: parsed answers, ``"yes"``, ``"no"`` or None (unparsable: wrong, and not an answer "no").

    Returns ``accuracy``, ``precision = #(pred no, label no) / #(pred no)``, ``recall = #(pred no, label no) /
    #(label no)``, ``f1``, and counts ``n``, ``answered_no``, ``label_no``, ``unparsed``. Zero denominators
    give 0.0.
    """
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    correct = sum(p == t for t, p in zip(labels, preds))
    answered_no = sum(p == "no" for p in preds)
    label_no = sum(t == "no" for t in labels)
    caught = sum(p == t == "no" for t, p in zip(labels, preds))
    precision, recall = _ratio(caught, answered_no), _ratio(caught, label_no)
    return {"accuracy": _ratio(correct, len(labels)), "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall), "n": len(labels),
            "answered_no": answered_no, "label_no": label_no, "unparsed": sum(p is None for p in preds)}


def amber_score(chair: float, f1: float) -> float:
    """The paper's single number: ``(1 - CHAIR + F1) / 2``, both as fractions (F1 of the discriminative task)."""
    return (1.0 - chair + f1) / 2.0


# ------------------------------------------------------------------------------------------- whole benchmark
def index_annotations(annotations: Sequence[Mapping]) -> dict[int, Mapping]:
    """``id -> record`` of ``annotations.json`` (a list of ``{"id", "type", "truth"[, "hallu"]}``), checked.

    A generative record needs ``truth`` and ``hallu`` lists of objects; a discriminative one a known ``type``
    (:data:`QUESTION_TYPES`) and ``truth`` ``"yes"`` / ``"no"``.
    """
    out: dict[int, Mapping] = {}
    for n, rec in enumerate(annotations):
        if not isinstance(rec, Mapping) or "id" not in rec:
            raise ValueError(f"annotations: record {n} has no 'id': {str(rec)[:120]}")
        rid = int(rec["id"])
        kind = rec.get("type")
        if rid in out:
            raise ValueError(f"annotations: id {rid} appears twice")
        if kind == GENERATIVE:
            if not isinstance(rec.get("truth"), list) or not isinstance(rec.get("hallu"), list):
                raise ValueError(f"annotations: generative id {rid} needs 'truth' and 'hallu' lists of objects")
        elif kind in QUESTION_TYPES:
            if str(rec.get("truth")).strip().lower() not in ("yes", "no"):
                raise ValueError(f"annotations: id {rid} ({kind}) has truth {rec.get('truth')!r}, expected yes/no")
        else:
            raise ValueError(f"annotations: id {rid} has unknown type {kind!r}; known: "
                             f"{[GENERATIVE, *QUESTION_TYPES]}")
        out[rid] = rec
    return out


def score_answers(annotations: Mapping[int, Mapping], answers: Mapping[int, str], lexicon: Optional[Lexicon],
                  rule: str = "first_word") -> list[dict]:
    """Per-answer results, in ``answers`` order.

    Args:
        annotations: :func:`index_annotations`.
        answers: ``id -> response text``; every id must be annotated.
        lexicon: :func:`build_lexicon`; needed only when a generative id is answered.
        rule: a name in :data:`ANSWER_RULES` for the yes/no questions.

    Returns:
        ``{"id", "type", "response", **score_description(...)}`` for a description and ``{"id", "type",
        "dimension", "kind", "label", "pred", "correct"}`` for a question.
    """
    if rule not in ANSWER_RULES:
        raise ValueError(f"unknown answer rule {rule!r}; known: {sorted(ANSWER_RULES)}")
    parse = ANSWER_RULES[rule]
    items = []
    for rid, response in answers.items():
        if rid not in annotations:
            raise ValueError(f"answer id {rid} is not in the annotations")
        rec = annotations[rid]
        if rec["type"] == GENERATIVE:
            if lexicon is None:
                raise ValueError(f"id {rid} is a description: scoring it needs relation.json (--word-association)")
            try:
                details = score_description(response, rec["truth"], rec["hallu"], lexicon)
            except ValueError as e:
                raise ValueError(f"annotations id {rid}: {e}") from None
            items.append({"id": rid, "type": GENERATIVE, "response": response, **details})
        else:
            dimension, kind = QUESTION_TYPES[rec["type"]]
            label, pred = str(rec["truth"]).strip().lower(), parse(response)
            items.append({"id": rid, "type": rec["type"], "dimension": dimension, "kind": kind, "label": label,
                          "pred": pred, "correct": pred == label})
    return items


def summarise(items: Sequence[dict]) -> dict:
    """The benchmark's numbers from :func:`score_answers` results.

    Returns ``{"generative": generative_metrics | None, "discriminative": {"overall" | dimension:
    discriminative_metrics}, "amber_score": float | None}``; a block is None / absent when nothing of it was
    answered, and the AMBER score needs both descriptions and questions.
    """
    descriptions = [it for it in items if it["type"] == GENERATIVE]
    questions = [it for it in items if it["type"] != GENERATIVE]
    groups: dict[str, list[dict]] = {"overall": questions}
    for dim in DIMENSIONS:
        groups[dim] = [q for q in questions if dim in (q["dimension"], q["kind"])]
    disc = {name: discriminative_metrics([q["label"] for q in qs], [q["pred"] for q in qs])
            for name, qs in groups.items() if qs}
    gen = generative_metrics(descriptions) if descriptions else None
    score = amber_score(gen["chair"], disc["overall"]["f1"]) if gen and questions else None
    return {"generative": gen, "discriminative": disc, "amber_score": score}
