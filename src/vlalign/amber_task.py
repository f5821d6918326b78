"""AMBER during training: the live policy describes AMBER images and answers its yes/no questions, every N validations.

    callbacks:
      - class_path: vlalign.evaluation.Evaluate
        init_args:
          tasks:
            - class_path: vlalign.amber_task.AmberTask
              init_args:
                annotations: AMBER/data/annotations.json   # relation.json, safe_words.txt read next to it
                queries: AMBER/data/query/query_all.json
                image_root: AMBER/image
                limit: 64                                  # the first 64 descriptions and the first 64 questions

A task of ``vlalign.evaluation`` (its module docstring has the interface): the subset is answered greedily with
``evaluation.answer_prompts`` (sharded over ranks, the same model calls on every rank) and scored with
``vlalign.metrics.amber`` (whose docstring says how the word matching differs from AMBER's official scorer).
Descriptions and yes/no questions are two generate passes with their own answer lengths.

Scalars (fractions), for what the subset holds: ``eval/amber/{chair, cover, hal, cog}`` (descriptions),
``eval/amber/<overall | existence | attribute | state | number | action | relation>/{accuracy, precision, recall,
f1}`` (questions, "no" the positive class), and ``eval/amber/amber_score`` = (1 - CHAIR + F1_overall) / 2 when the
subset has both. A small ``limit`` gives noisy figures: they follow a run's trend, they are not AMBER's numbers
(``eval/amber.py`` on the whole benchmark is).
"""

from __future__ import annotations

import os
from typing import Optional

from .data.schema import PromptRecord
from .evaluation import answer_prompts, subset
from .metrics.amber import (DISCRIMINATIVE_METRICS, GENERATIVE, GENERATIVE_METRICS, index_annotations, read_lexicon,
                            read_records, score_answers, summarise)


def amber_scalars(summary: dict) -> dict[str, float]:
    """``{"amber/<metric>": value}`` from ``metrics.amber.summarise``'s result (the keys of the module docstring)."""
    out: dict[str, float] = {}
    if summary["generative"]:
        out.update({f"amber/{k}": float(summary["generative"][k]) for k in GENERATIVE_METRICS})
    for name, m in summary["discriminative"].items():
        out.update({f"amber/{name}/{k}": float(m[k]) for k in DISCRIMINATIVE_METRICS})
    if summary["amber_score"] is not None:
        out["amber/amber_score"] = float(summary["amber_score"])
    return out


class AmberTask:
    """AMBER (descriptions: CHAIR, Cover, Hal, Cog; yes/no questions: accuracy, precision, recall, F1) on a subset.

    Args:
        annotations: AMBER's ``data/annotations.json``.
        queries: an AMBER query file (``data/query/query_*.json``: ``[{"id", "image", "query"}]``); its
            descriptions (generative ids) and questions are subsetted separately.
        image_root: the directory of the queries' image names (AMBER's ``image/``).
        word_association: AMBER's ``relation.json`` (default: next to ``annotations``); needed for descriptions.
        safe_words: AMBER's ``safe_words.txt`` (default: next to ``annotations`` when there).
        limit: descriptions, and questions, to answer (each the first ``limit``, or a sample with ``seed``); None: all.
        seed: draw the subsets with this seed instead of taking the first ``limit``.
        batch_size: prompts per generate call and rank.
        max_new_tokens: longest description.
        max_new_tokens_yes_no: longest answer to a yes/no question.
        answer_rule: how a yes/no answer is read (``metrics.amber.ANSWER_RULES``: first_word, exact, pope).
        prompt_suffix: appended to each yes/no question (descriptions get none).
        max_length: longest prompt in tokens, image tokens included.
    """

    name = "amber"
    headline = ("chair", "cover", "amber_score")

    def __init__(self, annotations: str, queries: str, image_root: str, word_association: Optional[str] = None,
                 safe_words: Optional[str] = None, limit: Optional[int] = 64, seed: Optional[int] = None,
                 batch_size: int = 16, max_new_tokens: int = 256, max_new_tokens_yes_no: int = 8,
                 answer_rule: str = "first_word", prompt_suffix: str = "", max_length: int = 1024):
        self.annotations_path, self.queries_path, self.image_root = annotations, queries, image_root
        self.word_association, self.safe_words = word_association, safe_words
        self.limit, self.seed, self.batch_size = limit, seed, batch_size
        self.max_new_tokens, self.max_new_tokens_yes_no = max_new_tokens, max_new_tokens_yes_no
        self.answer_rule, self.prompt_suffix, self.max_length = answer_rule, prompt_suffix, max_length
        self.annotations: dict = {}
        self.lexicon = None
        self.descriptions: list[dict] = []
        self.questions: list[dict] = []

    def _beside_annotations(self, given: Optional[str], name: str) -> Optional[str]:
        if given:
            return given
        path = os.path.join(os.path.dirname(os.path.abspath(self.annotations_path)), name)
        return path if os.path.exists(path) else None

    def setup(self, shapes_dir: Optional[str]) -> None:  # AMBER's files are the user's: shapes_dir is unused
        self.annotations = index_annotations(read_records(self.annotations_path))
        queries = read_records(self.queries_path)
        for q in queries:
            if int(q.get("id", -1)) not in self.annotations:
                raise ValueError(f"AmberTask.queries: {self.queries_path} has a query {str(q)[:80]} whose id is not "
                                 f"in {self.annotations_path}")
        items = [{"id": int(q["id"]), "text": q["query"], "image": os.path.join(self.image_root, q["image"])}
                 for q in queries]
        gen = [it for it in items if self.annotations[it["id"]]["type"] == GENERATIVE]
        disc = [it for it in items if self.annotations[it["id"]]["type"] != GENERATIVE]
        self.descriptions = [gen[i] for i in subset(len(gen), self.limit, self.seed)]
        self.questions = [disc[i] for i in subset(len(disc), self.limit, self.seed)]
        relation = self._beside_annotations(self.word_association, "relation.json")
        if self.descriptions and relation is None:
            raise ValueError("AmberTask.word_association: descriptions are scored against AMBER's relation.json; "
                             "give its path (it is not next to the annotations)")
        self.lexicon = read_lexicon(relation, self._beside_annotations(self.safe_words, "safe_words.txt")) \
            if relation else None

    def run(self, module, rank: int, world: int) -> list[dict]:
        out = []
        passes = ((self.descriptions, self.max_new_tokens, "", 0),
                  (self.questions, self.max_new_tokens_yes_no, self.prompt_suffix, len(self.descriptions)))
        for items, max_new, suffix, offset in passes:
            prompts = [(PromptRecord(str(it["id"]), [{"role": "user", "content": it["text"]}]), it["image"])
                       for it in items]
            answers = answer_prompts(module, prompts, rank, world, self.batch_size, max_new, self.max_length, suffix)
            for i, text in answers.items():
                scored = score_answers(self.annotations, {items[i]["id"]: text}, self.lexicon, self.answer_rule)[0]
                scored.pop("response", None)
                out.append({"index": offset + i, "answer": text, **scored})
        return out

    def metrics(self, results: list[dict]) -> dict[str, float]:
        return amber_scalars(summarise(results))

    def samples(self, results: list[dict], n: int) -> list[dict[str, str]]:
        """Half descriptions, half questions (the first of each), so both kinds can be followed."""
        gen = [r for r in results if r["type"] == GENERATIVE]
        disc = [r for r in results if r["type"] != GENERATIVE]
        k = min(len(gen), (n + 1) // 2)
        chosen = gen[:k] + disc[:n - k]
        rows = []
        for r in chosen:
            item = (self.descriptions + self.questions)[r["index"]]
            if r["type"] == GENERATIVE:
                rec = self.annotations[r["id"]]
                truth = f"truth: {', '.join(rec['truth'])}" + (
                    f" (hallucinated: {', '.join(r['hallucinated'])})" if r["hallucinated"] else "")
            else:
                truth = r["label"]
            rows.append({"id": str(r["id"]), "question": item["text"], "answer": r["answer"], "truth": truth})
        return rows
