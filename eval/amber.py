"""AMBER: LLM-free hallucination benchmark (descriptions: CHAIR, Cover, Hal, Cog; yes/no questions: accuracy,
precision, recall, F1 per dimension; the AMBER score) from a model's answers to AMBER's queries.

    python eval/amber.py --annotations AMBER/data/annotations.json --queries AMBER/data/query/query_all.json \
        --answers answers.jsonl --out amber.json
    # the same, naming the word lists (by default read next to annotations.json, as in AMBER's data/ folder)
    python eval/amber.py --annotations AMBER/data/annotations.json --answers answers.json \
        --word-association AMBER/data/relation.json --safe-words AMBER/data/safe_words.txt --out amber.json

AMBER (Wang et al. 2023, arXiv 2311.07397, https://github.com/junyangwang0410/AMBER): download its ``data/``
folder and the images. The metrics and how this scorer's word matching differs from the official one (no
NLTK / spaCy here) are documented in ``vlalign.metrics.amber``. Scoring runs on CPU in seconds.

End to end with this project's generator (it reads JSON lines ``{question_id, image, text}``, so convert the
query file first; one question file per task keeps the generation length and prompt suffix apart):

    python eval/amber.py --queries AMBER/data/query/query_generative.json --to-questions amber_gen.jsonl
    python eval/amber.py --queries AMBER/data/query/query_discriminative.json --to-questions amber_disc.jsonl
    python eval/generate.py --model runs/dpo/export --questions amber_gen.jsonl --image-root AMBER/image \
        --out answers_gen.jsonl --max-new-tokens 512
    python eval/generate.py --model runs/dpo/export --questions amber_disc.jsonl --image-root AMBER/image \
        --out answers_disc.jsonl --max-new-tokens 8
    python eval/amber.py --annotations AMBER/data/annotations.json --queries AMBER/data/query/query_all.json \
        --answers answers_gen.jsonl answers_disc.jsonl --out amber.json

Inputs:

* ``--annotations``: AMBER's ``annotations.json``, a JSON list of ``{"id", "type", "truth"[, "hallu"]}``.
* ``--answers``: one or more files, each a JSON list (AMBER's own response format, ``[{"id", "response"}]``)
  or JSON lines; a record's id is ``id`` or ``question_id`` (``eval/generate.py``'s output) and its text
  ``response``, ``text`` or ``answer``.
* ``--queries`` (optional): an AMBER query file (JSON list of ``{"id", "image", "query"}``). It chooses what is
  scored, like the official ``--evaluation_type``: every query must have an answer (``--allow-missing`` leaves
  unanswered ones out and reports how many), answers to other ids are ignored. Without it every answer counts.
* ``--word-association`` / ``--safe-words``: AMBER's ``relation.json`` and ``safe_words.txt`` (needed only to
  score descriptions).
* ``--answer-rule``: how a yes/no answer is read (``first_word``: default; ``exact``: the official scorer's
  "Yes"/"No" only; ``pope``: SeVa's POPE rule).

``--out`` gets ``{"generative": {chair, cover, hal, cog, ...}, "discriminative": {overall, existence,
attribute, state, number, action, relation: {accuracy, precision, recall, f1, ...}}, "amber_score", ...}`` as
fractions; the printed table is in percent, like the paper's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Optional

from vlalign.metrics.amber import (ANSWER_RULES, DIMENSIONS, DISCRIMINATIVE_METRICS, GENERATIVE_METRICS,
                                   index_annotations, read_lexicon, read_records, score_answers, summarise)

ID_KEYS = ("id", "question_id")
TEXT_KEYS = ("response", "text", "answer")


def _field(rec: dict, keys: Sequence[str], path: str, what: str):
    for k in keys:
        if k in rec:
            return rec[k]
    raise ValueError(f"{path}: a record has no {what} (one of {list(keys)}): {json.dumps(rec)[:120]}")


def load_answers(paths: Sequence[str]) -> dict[int, str]:
    """``id -> response`` over all answer files; one id answered twice differently is an error."""
    answers: dict[int, str] = {}
    for path in paths:
        for rec in read_records(path):
            rid = int(_field(rec, ID_KEYS, path, "id"))
            text = _field(rec, TEXT_KEYS, path, "response")
            if not isinstance(text, str):
                raise ValueError(f"{path}: id {rid} has a response that is not a string: {text!r}")
            if answers.get(rid, text) != text:
                raise ValueError(f"{path}: id {rid} has two different answers")
            answers[rid] = text
    return answers


def select_answers(answers: Mapping[int, str], query_ids: Optional[Sequence[int]],
                   allow_missing: bool = False) -> tuple[dict[int, str], dict]:
    """The answers to score (in query order) and ``{"missing", "ignored"}`` counts.

    Without ``query_ids`` every answer is scored. With them, a query without an answer is an error unless
    ``allow_missing`` (then it is left out and counted), and answers to other ids are ignored (counted).
    """
    if query_ids is None:
        return dict(answers), {"missing": 0, "ignored": 0}
    missing = [q for q in query_ids if q not in answers]
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} queries have no answer (first ids: {missing[:5]}); "
                         "--allow-missing leaves them out")
    wanted = set(query_ids)
    chosen = {q: answers[q] for q in query_ids if q in answers}
    return chosen, {"missing": len(missing), "ignored": sum(a not in wanted for a in answers)}


def write_questions(queries: Sequence[dict], path: str, source: str = "queries") -> int:
    """AMBER queries as ``eval/generate.py`` questions: JSON lines ``{"question_id", "image", "text"}``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for q in queries:
            qid = _field(q, ("id",), source, "id")
            f.write(json.dumps({"question_id": int(qid), "image": _field(q, ("image",), source, "image"),
                                "text": _field(q, ("query",), source, "query")}, ensure_ascii=False) + "\n")
    return len(queries)


def format_table(summary: Mapping) -> str:
    """Plain-text tables in percent: the generative row, the discriminative rows, the AMBER score."""
    lines = []
    gen = summary["generative"]
    if gen:
        lines.append(f"{'generative (%)':<20}" + "".join(f"{c.upper() if c == 'chair' else c.title():>10}"
                                                        for c in GENERATIVE_METRICS) + f"{'n':>8}")
        lines.append(" " * 20 + "".join(f"{100 * gen[c]:>10.1f}" for c in GENERATIVE_METRICS) + f"{gen['n']:>8d}")
    disc = summary["discriminative"]
    if disc:
        lines.append(f"{'discriminative (%)':<20}" + "".join(f"{c:>10}" for c in DISCRIMINATIVE_METRICS)
                     + f"{'n':>8}")
        for name in ("overall", *DIMENSIONS):
            if name in disc:
                label = f"  {name}" if name in ("state", "number", "action") else name
                lines.append(f"{label:<20}" + "".join(f"{100 * disc[name][c]:>10.1f}" for c in DISCRIMINATIVE_METRICS)
                             + f"{disc[name]['n']:>8d}")
    if summary["amber_score"] is not None:
        lines.append(f"{'AMBER score (%)':<20}{100 * summary['amber_score']:>10.1f}")
    return "\n".join(lines)


def _default_beside(annotations: str, name: str) -> Optional[str]:
    path = os.path.join(os.path.dirname(os.path.abspath(annotations)), name)
    return path if os.path.exists(path) else None


def evaluate(args) -> dict:
    """Score the answers named by ``args`` (see :func:`parse_args`): the summary, counts and settings."""
    with open(args.annotations, encoding="utf-8") as f:
        annotations = index_annotations(json.load(f))
    query_ids = None
    if args.queries:
        query_ids = [int(_field(q, ("id",), args.queries, "id")) for q in read_records(args.queries)]
    answers, counts = select_answers(load_answers(args.answers), query_ids, args.allow_missing)
    relation = args.word_association or _default_beside(args.annotations, "relation.json")
    safe = args.safe_words or _default_beside(args.annotations, "safe_words.txt")
    lexicon = read_lexicon(relation, safe) if relation else None
    items = score_answers(annotations, answers, lexicon, args.answer_rule)
    return {**summarise(items), **counts, "answer_rule": args.answer_rule, "word_association": relation,
            "safe_words": safe}


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", help="AMBER's data/annotations.json")
    p.add_argument("--queries", help="an AMBER query file (data/query/query_*.json): what to score")
    p.add_argument("--answers", nargs="+", help="answer files: AMBER's [{id, response}] or JSON lines "
                   "{question_id, text} from eval/generate.py")
    p.add_argument("--word-association", help="AMBER's relation.json (default: next to --annotations)")
    p.add_argument("--safe-words", help="AMBER's safe_words.txt (default: next to --annotations)")
    p.add_argument("--answer-rule", default="first_word", choices=sorted(ANSWER_RULES),
                   help="how a yes/no answer is read (exact: the official scorer's 'Yes'/'No' only)")
    p.add_argument("--allow-missing", action="store_true", help="leave queries without an answer out")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--to-questions", metavar="PATH",
                   help="instead of scoring: write --queries as eval/generate.py questions (JSON lines) to PATH")
    args = p.parse_args(argv)
    if args.to_questions:
        if not args.queries:
            p.error("--to-questions needs --queries")
    elif not (args.annotations and args.answers):
        p.error("scoring needs --annotations and --answers")
    return p, args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p, args = parse_args(argv)
    try:
        if args.to_questions:
            n = write_questions(read_records(args.queries), args.to_questions, args.queries)
            print(f"wrote {n} questions to {args.to_questions}")
            return {"questions": n, "out": args.to_questions}
        result = evaluate(args)
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    print(format_table(result))
    if result["missing"] or result["ignored"]:
        print(f"missing answers: {result['missing']}, ignored answers: {result['ignored']}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
