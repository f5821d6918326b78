"""Evaluation during training: POPE, CHAIR and reward accuracy of the live policy, logged as ``eval/*`` scalars.

    callbacks:
      - class_path: vlalign.evaluation.Evaluate
        init_args:
          every_n_validations: 1          # after every validation pass, and once more at the end of fit
          tasks:
            - class_path: vlalign.evaluation.PopeTask
              init_args: {questions: shapes, limit: 32}        # the first 32 questions of each POPE file
            - class_path: vlalign.evaluation.ChairTask
              init_args: {prompts: shapes, limit: 16}
            - class_path: vlalign.evaluation.RewardAccuracyTask   # reward models, and DPO's implicit reward
              init_args: {shards: shapes, limit: 64}

Why: "the loss went down" does not say whether the model hallucinates less or still answers. These tasks run the
model being trained (its LoRA adapter on, no export) on a fixed subset of a benchmark every N validations and at
the end of fit: greedy decoding with the KV cache (``Backbone.generate`` on left-padded prompts, through
``generation.generate``), so two runs of the same checkpoint give the same figures. ``shapes`` resolves a task's
files from the DataModule's ``shapes_dir`` (the embedded world writes ``eval/pope_*.jsonl``, ``eval/chair_*.json``,
``eval/captions_prompts.jsonl`` and ``eval/images/``; see ``data.shapes``). When that world is not there (a config
that trains on its own shards) such a task is left out of the run with a warning; a missing file given by path is
an error.

What is logged (rank 0, at ``trainer.global_step``), through every logger:

* scalars ``eval/<key>`` for each key of a task's ``metrics``: ``eval/pope_random/f1``,
  ``eval/pope_adversarial/accuracy``, ``eval/chair/chair_i``, ``eval/chair/chair_s``, ``eval/chair/recall``,
  ``eval/reward/accuracy``, ... and ``eval/seconds`` (the wall time of the whole evaluation); they also go into
  ``trainer.callback_metrics``, so a ``ModelCheckpoint`` may monitor them;
* with a TensorBoard logger also a text table of the first ``samples`` examples of each task (question, answer,
  ground truth; the same examples every time, so their answers can be followed through training) under
  ``eval/<task name>/samples``, and a plot of the history of each task's headline metrics under ``eval/history``.
  Other loggers get the scalars only.

Several processes (DDP, DeepSpeed ZeRO): each rank takes every ``world``-th example of the subset
(``rank_batches``), the per-example results are gathered on every rank (``gather_results``) and the metrics
computed from all of them, so the figures do not depend on the world size. Every rank runs the same number of
generate / forward calls (a rank whose share ran out answers a padding prompt and drops it): under ZeRO-3 every
forward is a collective, and ``Backbone.generate`` turns on ``synced_gpus`` itself.

**The task interface** (what ``Evaluate`` calls; a new benchmark is one more class with these members)::

    name: str                                   the task's name: its samples tag is eval/<name>/samples
    headline: tuple[str, ...]                   suffixes of the metric keys to plot (e.g. ("f1", "yes_ratio"))
    setup(shapes_dir: str | None) -> None       resolve "shapes" paths against the DataModule's shapes_dir and read
                                                the fixed subset; called once per fit on every rank, after
                                                prepare_data (the shapes world exists), before any run
    run(module, rank: int, world: int) -> list[dict]
                                                answer / score this rank's share of the subset with the live
                                                ``AlignModule`` (``module.backbone``; eval mode and no_grad are set
                                                by the caller); one dict per example, each with "index" (its
                                                position in the subset) and only picklable values; every rank must
                                                make the same number of model calls (use ``rank_batches``)
    metrics(results: list[dict]) -> dict[str, float]
                                                the figures from every rank's results, in index order; keys are
                                                logged as eval/<key> ("pope_random/f1", "chair/chair_i")
    samples(results: list[dict], n: int) -> list[dict[str, str]]
                                                n fixed rows for the text table: {"id", "question", "answer",
                                                "truth"}

``answer_prompts(module, prompts, rank, world, batch_size, max_new_tokens, ...)`` does the sharded, padded, batched
greedy generation for any list of ``(PromptRecord, image path or None)``; a generation task builds its prompts in
``setup`` and scores the answers with a function of ``vlalign.metrics``.

Cost, measured on 2 CPU cores (the YAML headers): POPE 3 x 48 questions plus CHAIR 24 captions take ~1.2 s per
evaluation on the tiny model, ~7% of ``conf/dpo.yaml``'s 120 training steps with two evaluations.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import lightning as L
import torch
from PIL import Image

from .data.schema import IMAGE_TOKEN, PromptRecord
from .data.shapes import STRATEGIES
from .metrics.chair import build_vocab, chair_metrics, score_caption
from .metrics.pope import RATES, parse_answer, pope_metrics, row_name
from .metrics.reward import grouped_accuracy, reward_metrics

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- the interface
@runtime_checkable
class EvalTask(Protocol):
    """One benchmark on a fixed subset (the module docstring describes each member)."""

    name: str
    headline: tuple[str, ...]

    def setup(self, shapes_dir: Optional[str]) -> None: ...

    def run(self, module, rank: int, world: int) -> list[dict]: ...

    def metrics(self, results: list[dict]) -> dict[str, float]: ...

    def samples(self, results: list[dict], n: int) -> list[dict[str, str]]: ...


# -------------------------------------------------------------------------------------- sharding and gathering
def rank_batches(n: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """This rank's share of ``n`` examples, ``batch_size`` at a time, padded with empty batches so that every rank
    gets the same number of batches: ceil(ceil(n / world) / batch_size).

    Rank r takes examples r, r + world, r + 2 world, ... (a strided split: each rank gets a spread of the subset,
    and the shares differ in size by at most one). An empty batch still has to make one (padding) model call.
    """
    if not 0 <= rank < world or batch_size < 1:
        raise ValueError(f"need 0 <= rank < world and batch_size >= 1, got rank {rank}, world {world}, "
                         f"batch_size {batch_size}")
    mine = list(range(rank, n, world))
    calls = math.ceil(math.ceil(n / world) / batch_size)
    return [mine[i * batch_size:(i + 1) * batch_size] for i in range(calls)]


def gather_results(local: list[dict], world: int) -> list[dict]:
    """Every rank's results on every rank, sorted by ``"index"`` (a collective when ``world > 1``)."""
    parts = [local]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * world
        torch.distributed.all_gather_object(parts, local)
    return sorted((r for part in parts for r in part), key=lambda r: r["index"])


def subset(n: int, limit: Optional[int], seed: Optional[int]) -> list[int]:
    """Positions of the fixed subset of ``n`` items: the first ``limit`` (``seed`` None), or ``limit`` drawn with
    ``random.Random(seed)`` and kept in file order; all when ``limit`` is None or at least ``n``."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return list(range(limit)) if seed is None else sorted(random.Random(seed).sample(range(n), limit))


# ------------------------------------------------------------------------------------------------- generation
def _load_image(path: Optional[str]) -> list:
    if path is None:
        return []
    with Image.open(path) as im:
        return [im.convert("RGB")]


def answer_prompts(module, prompts: Sequence[tuple[PromptRecord, Optional[str]]], rank: int, world: int,
                   batch_size: int, max_new_tokens: int, max_length: int = 1024,
                   prompt_suffix: str = "") -> dict[int, str]:
    """Greedy answers of ``module.backbone`` (adapter on) to this rank's share of ``prompts``: {index: text}.

    prompts: ``(record, image path or None)``; the record's prompt turns are encoded with the training template
    (``generation.prompt_encode``, which adds the image placeholder). Batches are left-padded and decoded with the
    KV cache (``generation.generate``). A padding batch (this rank's share ran out) answers prompt 0 and drops it.
    """
    from .generation import Sampling, generate, prompt_encode

    backbone = module.backbone
    encode = prompt_encode(backbone, max_length, prompt_suffix)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    out: dict[int, str] = {}
    for batch in rank_batches(len(prompts), rank, world, batch_size):
        todo = batch or [0]
        examples = [encode(prompts[i][0], _load_image(prompts[i][1])) for i in todo]
        texts = generate(backbone, examples, sampling)
        out.update(zip(batch, texts))
    return out


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ShapesWorldMissing(ValueError):
    """A task set to ``"shapes"`` finds no embedded world: no DataModule ``shapes_dir``, or no ``eval/`` under it
    (the world is built only when ``data.train`` or ``data.val`` is ``shapes``). ``Evaluate`` warns and leaves the
    task out of that fit instead of failing it: a config that trains on its own shards still runs."""


def _need_shapes(shapes_dir: Optional[str], task: str, key: str) -> str:
    if not shapes_dir:
        raise ShapesWorldMissing(f"{task}({key}='shapes') resolves its files from the DataModule's shapes_dir, but "
                                 "the trainer has no DataModule with one: give the file paths instead")
    if not os.path.isdir(os.path.join(shapes_dir, "eval")):
        raise ShapesWorldMissing(f"{task}({key}='shapes'): no shapes world under data.shapes_dir={shapes_dir!r} "
                                 "(it is built only when data.train or data.val is 'shapes'): give the file paths "
                                 "instead, or remove the task")
    return shapes_dir


def _prompt(item_id: str, text: str, meta: dict) -> PromptRecord:
    return PromptRecord(str(item_id), [{"role": "user", "content": text}], meta=meta)


# ----------------------------------------------------------------------------------------------------- POPE
class PopeTask:
    """POPE: yes/no object questions; accuracy, precision, recall, F1 and yes-ratio per question file.

    Args:
        questions: ``"shapes"`` (the embedded world's random, popular and adversarial files) or POPE question files
            (JSON lines ``{"question_id", "image", "text", "label"}``); each gives the scalars
            ``eval/pope_<row>/<metric>``, the row named as ``eval/pope.py`` names it (``coco_pope_random.json`` ->
            ``random``).
        image_root: the directory the questions' image names are relative to (``"shapes"``: the world's
            ``eval/images``; default with ``questions: shapes``).
        limit: questions per file (the first ``limit``, or a sample with ``seed``); None: all.
        seed: draw the subset with this seed instead of taking the first ``limit``.
        batch_size: prompts per generate call and rank.
        max_new_tokens: longest answer (only the first sentence is parsed, SeVa's rule).
        prompt_suffix: appended to each question (LLaVA's POPE: "\\nAnswer the question using a single word or
            phrase.").
        max_length: longest prompt in tokens, image tokens included.
    """

    name = "pope"
    headline = ("f1", "yes_ratio")

    def __init__(self, questions: Union[str, list[str]] = "shapes", image_root: Optional[str] = None,
                 limit: Optional[int] = 32, seed: Optional[int] = None, batch_size: int = 16,
                 max_new_tokens: int = 8, prompt_suffix: str = "", max_length: int = 1024):
        self.questions, self.image_root, self.limit, self.seed = questions, image_root, limit, seed
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.prompt_suffix, self.max_length = prompt_suffix, max_length
        self.items: list[dict] = []

    def setup(self, shapes_dir: Optional[str]) -> None:
        paths, root = self.questions, self.image_root
        if paths == "shapes":
            base = _need_shapes(shapes_dir, "PopeTask", "questions")
            paths = [os.path.join(base, "eval", f"pope_{s}.jsonl") for s in STRATEGIES]
            root = root if root not in (None, "shapes") else os.path.join(base, "eval", "images")
        elif root == "shapes":
            root = os.path.join(_need_shapes(shapes_dir, "PopeTask", "image_root"), "eval", "images")
        paths = [paths] if isinstance(paths, str) else list(paths)
        if root is None:
            raise ValueError("PopeTask.image_root: give the directory the questions' image names are relative to")
        self.items = []
        for path in paths:
            records = _read_jsonl(path)
            for i in subset(len(records), self.limit, self.seed):
                q = records[i]
                label = str(q["label"]).strip().lower()
                if label not in ("yes", "no"):
                    raise ValueError(f"{path}: question_id {q['question_id']} has label {q['label']!r}, "
                                     "expected yes or no")
                self.items.append({"split": row_name(path), "question_id": q["question_id"], "text": q["text"],
                                   "image": os.path.join(root, q["image"]) if q.get("image") else None,
                                   "label": label})

    def run(self, module, rank: int, world: int) -> list[dict]:
        prompts = [(_prompt(it["question_id"], it["text"], {}), it["image"]) for it in self.items]
        answers = answer_prompts(module, prompts, rank, world, self.batch_size, self.max_new_tokens,
                                 self.max_length, self.prompt_suffix)
        return [{"index": i, "split": self.items[i]["split"], "question_id": self.items[i]["question_id"],
                 "answer": text, "pred": parse_answer(text), "label": self.items[i]["label"]}
                for i, text in answers.items()]

    def metrics(self, results: list[dict]) -> dict[str, float]:
        return pope_scalars(results)

    def samples(self, results: list[dict], n: int) -> list[dict[str, str]]:
        return [{"id": f"{r['split']}/{r['question_id']}", "question": self.items[r["index"]]["text"],
                 "answer": r["answer"], "truth": r["label"]} for r in results[:n]]


def pope_scalars(results: Sequence[dict]) -> dict[str, float]:
    """``{"pope_<split>/<rate>": value}`` from per-question results ``{"split", "label", "pred"}`` (rates: accuracy,
    precision, recall, f1, yes_ratio; see ``metrics.pope.pope_metrics``), splits in order of first appearance."""
    by_split: dict[str, list[dict]] = {}
    for r in results:
        by_split.setdefault(r["split"], []).append(r)
    out = {}
    for split, rs in by_split.items():
        m = pope_metrics([r["label"] for r in rs], [r["pred"] for r in rs])
        out.update({f"pope_{split}/{k}": float(m[k]) for k in RATES})
    return out


# ---------------------------------------------------------------------------------------------------- CHAIR
class ChairTask:
    """CHAIR: captions of held-out images scored for hallucinated objects; CHAIRs, CHAIRi, recall.

    Args:
        prompts: ``"shapes"`` (the embedded world's ``eval/captions_prompts.jsonl``) or a JSON-lines file of caption
            prompts ``{"image_id", "image", "text"}``.
        vocab: ``"shapes"`` or a JSON file ``canonical object -> [synonyms]`` (as ``eval/chair.py --vocab``).
        gt: ``"shapes"`` or a JSON file ``image_id -> [canonical objects]`` (as ``eval/chair.py --gt``).
        image_root: directory of the prompts' image names (``"shapes"``: the world's ``eval/images``; default with
            ``prompts: shapes``).
        limit: captions (the first ``limit``, or a sample with ``seed``); None: all.
        seed: draw the subset with this seed instead of taking the first ``limit``.
        batch_size: prompts per generate call and rank.
        max_new_tokens: longest caption.
        max_length: longest prompt in tokens, image tokens included.

    Scalars: ``eval/chair/{chair_s, chair_i, recall, objects_per_caption, words_per_caption}`` (CHAIRi counts every
    mention, as the original and ``eval/chair.py`` do).
    """

    name = "chair"
    headline = ("chair_i", "chair_s", "recall")

    def __init__(self, prompts: str = "shapes", vocab: str = "shapes", gt: str = "shapes",
                 image_root: Optional[str] = None, limit: Optional[int] = 16, seed: Optional[int] = None,
                 batch_size: int = 16, max_new_tokens: int = 48, max_length: int = 1024):
        self.prompts_path, self.vocab_path, self.gt_path, self.image_root = prompts, vocab, gt, image_root
        self.limit, self.seed, self.batch_size = limit, seed, batch_size
        self.max_new_tokens, self.max_length = max_new_tokens, max_length
        self.items: list[dict] = []
        self.vocab = None
        self.gt: dict[str, list[str]] = {}

    def setup(self, shapes_dir: Optional[str]) -> None:
        def resolve(value, key, rel):
            if value == "shapes":
                return os.path.join(_need_shapes(shapes_dir, "ChairTask", key), "eval", rel)
            return value

        prompts = resolve(self.prompts_path, "prompts", "captions_prompts.jsonl")
        root = self.image_root
        if root is None and self.prompts_path == "shapes" or root == "shapes":
            root = resolve("shapes", "image_root", "images")
        with open(resolve(self.vocab_path, "vocab", "chair_vocab.json")) as f:
            self.vocab = build_vocab(json.load(f))
        gt_path = resolve(self.gt_path, "gt", "chair_gt.json")
        with open(gt_path) as f:
            self.gt = {str(k): list(v) for k, v in json.load(f).items()}
        records = _read_jsonl(prompts)
        self.items = []
        for i in subset(len(records), self.limit, self.seed):
            rec = records[i]
            iid = str(rec["image_id"])
            if iid not in self.gt:
                raise ValueError(f"{prompts}: image_id {iid} has no ground-truth objects in {gt_path}")
            if rec.get("image") and root is None:
                raise ValueError("ChairTask.image_root: give the directory the prompts' image names are relative to")
            self.items.append({"image_id": iid, "text": rec["text"],
                               "image": os.path.join(root, rec["image"]) if rec.get("image") else None})

    def run(self, module, rank: int, world: int) -> list[dict]:
        prompts = [(_prompt(it["image_id"], it["text"], {}), it["image"]) for it in self.items]
        answers = answer_prompts(module, prompts, rank, world, self.batch_size, self.max_new_tokens,
                                 self.max_length)
        out = []
        for i, text in answers.items():
            iid = self.items[i]["image_id"]
            out.append({"index": i, "image_id": iid, "answer": text,
                        **score_caption(text, self.gt[iid], self.vocab)})
        return out

    def metrics(self, results: list[dict]) -> dict[str, float]:
        m = chair_metrics(results)
        return {f"chair/{k}": float(m[k]) for k in ("chair_s", "chair_i", "recall", "objects_per_caption",
                                                    "words_per_caption")}

    def samples(self, results: list[dict], n: int) -> list[dict[str, str]]:
        return [{"id": r["image_id"], "question": self.items[r["index"]]["text"], "answer": r["answer"],
                 "truth": ", ".join(self.gt[r["image_id"]])
                 + (f" (hallucinated: {', '.join(r['hallucinated'])})" if r["hallucinated"] else "")}
                for r in results[:n]]


# ------------------------------------------------------------------------------------------- reward accuracy
def pair_scores(module, batch: dict) -> torch.Tensor:
    """Per-response scores (batch, k) of a ``pairs`` batch: a ``RewardModule``'s rewards, or a ``DPOModule``'s
    implicit reward beta * (log pi - log pi_ref) (beta * log pi for reference-free losses), as its step logs them
    under ``rewards/``."""
    from .dpo import DPOModule
    from .logps import pair_image_features
    from .losses import dpo_rewards
    from .reward import RewardModule, pair_rewards

    if isinstance(module, RewardModule):
        return pair_rewards(module.backbone, module.head, batch)
    if isinstance(module, DPOModule):
        feats = pair_image_features(module.backbone, batch)
        pol = module.policy_logps(batch, feats)
        if not module.objective.needs_reference:
            return module.beta * pol.get(module.logp)
        ref = module.reference_logps(batch, feats)
        return dpo_rewards(pol.get(module.logp) - ref.get(module.logp).to(pol.sum.dtype), module.beta)
    raise TypeError(f"RewardAccuracyTask scores a RewardModule or a DPOModule, not a {type(module).__name__}")


class RewardAccuracyTask:
    """Reward accuracy on held-out preference pairs: how often the chosen response scores above the rejected.

    For a ``RewardModule`` the score is its reward; for a ``DPOModule`` DPO's implicit reward (``pair_scores``).
    With ranked lists (``num_responses`` k > 2) a list counts as right when its first response beats its last.

    Args:
        shards: ``"shapes"`` (the embedded world's ``preference/val-*.tar``) or preference shards (paths, globs,
            ``{a..b}``, directories).
        limit: pairs: the first ``limit`` good samples of the shards (read in order); None: all.
        batch_size: pairs per forward and rank.
        max_length: longest sequence in tokens (longer responses are cut, as in training).
        group_by: also report the accuracy per value of this record ``meta`` key (``eval/reward/by_<key>/<value>``;
            the shapes world's ``corruption``); None: no groups.

    Scalars: ``eval/reward/{accuracy, margin_mean, chosen_mean, rejected_mean}`` (and the groups). Bad samples are
    skipped and counted as ``eval/reward/skipped``.
    """

    name = "reward"
    headline = ("accuracy",)

    def __init__(self, shards: Union[str, list[str]] = "shapes", limit: Optional[int] = 64, batch_size: int = 16,
                 max_length: int = 512, group_by: Optional[str] = "corruption"):
        self.shards, self.limit, self.batch_size = shards, limit, batch_size
        self.max_length, self.group_by = max_length, group_by
        self.samples_read: list = []
        self.skipped: Counter = Counter()
        self._encoded: Optional[tuple] = None

    def setup(self, shapes_dir: Optional[str]) -> None:
        from .generation import read_samples

        urls = self.shards
        if urls == "shapes":
            urls = os.path.join(_need_shapes(shapes_dir, "RewardAccuracyTask", "shards"), "preference", "val-*.tar")
        self.skipped = Counter()
        self.samples_read = list(read_samples(urls, self.limit, self.skipped))
        self._encoded = None

    def _examples(self, module) -> tuple[list, dict]:
        """The pairs encoded for ``module`` (once: the tokenizer does not change during fit) and its batch spec."""
        from .data.chat import Encoder
        from .data.pipeline import Encode
        from .data.shards import SampleError

        spec = module.batch_spec()
        if spec.get("format") != "pairs":
            raise ValueError(f"RewardAccuracyTask needs a module that trains on pairs, not {spec.get('format')!r}")
        if self._encoded is None or self._encoded[1] != spec:
            bb = module.backbone
            encode = Encode(Encoder(bb.tokenizer, bb.processor.chat_template, bb.num_image_tokens),
                            bb.processor.image_processor, "pairs", self.max_length, spec.get("num_responses", 2),
                            use_ref_logps=bool(spec.get("ref_logps")))
            examples = []
            for record, images in self.samples_read:
                try:
                    examples.append((encode(record, images), record.meta.get(self.group_by) if self.group_by
                                     else None))
                except SampleError as e:
                    self.skipped[e.reason] += 1
            self._encoded = (examples, spec)
        return self._encoded

    def run(self, module, rank: int, world: int) -> list[dict]:
        from functools import partial

        from .data.collate import collate_pairs, to_device

        examples, spec = self._examples(module)
        collate = partial(collate_pairs, pad_id=module.backbone.tokenizer.pad_token_id,
                          layout=spec.get("layout", "packed"))
        device = next(module.backbone.parameters()).device
        out = []
        for batch in rank_batches(len(examples), rank, world, self.batch_size):
            todo = batch or [0]
            scores = pair_scores(module, to_device(collate([examples[i][0] for i in todo]), device)).float().cpu()
            for i, row in zip(batch, scores):
                out.append({"index": i, "id": examples[i][0].id, "chosen": float(row[0]), "rejected": float(row[-1]),
                            "group": examples[i][1]})
        return out

    def metrics(self, results: list[dict]) -> dict[str, float]:
        if not results:
            return {"reward/skipped": float(sum(self.skipped.values()))}
        chosen, rejected = [r["chosen"] for r in results], [r["rejected"] for r in results]
        m = reward_metrics(chosen, rejected, n_boot=0)
        out = {f"reward/{k}": m[k] for k in ("accuracy", "margin_mean", "chosen_mean", "rejected_mean")}
        if self.group_by and any(r["group"] is not None for r in results):
            groups = {r["id"]: r["group"] for r in results if r["group"] is not None}
            for value, g in grouped_accuracy([r["id"] for r in results], chosen, rejected, groups).items():
                out[f"reward/by_{self.group_by}/{value}"] = g["accuracy"]
        out["reward/skipped"] = float(sum(self.skipped.values()))
        return out

    def samples(self, results: list[dict], n: int) -> list[dict[str, str]]:
        records = {r.id: r for r, _ in self.samples_read}
        rows = []
        for r in results[:n]:
            rec = records[r["id"]]
            prompt = rec.prompt[-1]["content"].replace(IMAGE_TOKEN, "").strip()
            rows.append({"id": r["id"], "question": prompt,
                         "answer": f"chosen {r['chosen']:.3f} vs rejected {r['rejected']:.3f}",
                         "truth": f"chosen: {rec.chosen} / rejected: {rec.rejected}"})
        return rows


# ---------------------------------------------------------------------------------------------- the callback
def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """A Markdown table (TensorBoard renders it) of ``rows`` with the columns id, question, answer, truth."""
    cols = ("id", "question", "answer", "truth")

    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def history_figure(history: Sequence[tuple[int, dict[str, float]]], tasks: Sequence[EvalTask]):
    """A matplotlib figure: one panel per task, one line per headline metric over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.2), squeeze=False)
    steps = [s for s, _ in history]
    for ax, task in zip(axes[0], tasks):
        keys = sorted({k for _, m in history for k in m
                       if k.startswith(f"eval/{task.name}") and k.rsplit("/", 1)[-1] in task.headline})
        for key in keys:
            ax.plot(steps, [m.get(key, float("nan")) for _, m in history], marker="o", ms=3,
                    label=key[len("eval/"):])
        ax.set_title(task.name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


class Evaluate(L.Callback):
    """Run evaluation tasks on the live policy every N validations and at the end of fit (module docstring).

    Args:
        tasks: the benchmarks (``PopeTask``, ``ChairTask``, ``RewardAccuracyTask``, or any class with the task
            interface of the module docstring).
        every_n_validations: evaluate after every N-th validation pass (the sanity check does not count); 0: never
            after validation.
        at_fit_end: evaluate when training ends, unless the last validation already evaluated that step.
        at_fit_start: evaluate once before the first training step (the "before" of a before / after comparison;
            not again when a run resumes from a checkpoint).
        samples: rows of each task's text table (TensorBoard only; 0: no table).
        plot: add the plot of the metric history (TensorBoard only).
    """

    def __init__(self, tasks: list[EvalTask], every_n_validations: int = 1, at_fit_end: bool = True,
                 samples: int = 4, plot: bool = True, at_fit_start: bool = False):
        if every_n_validations < 0:
            raise ValueError(f"Evaluate.every_n_validations must be >= 0, got {every_n_validations}")
        for t in tasks:
            if not isinstance(t, EvalTask):
                raise TypeError(f"Evaluate.tasks: {type(t).__name__} lacks the task interface "
                                "(name, headline, setup, run, metrics, samples)")
        if len({t.name for t in tasks}) < len(tasks):
            raise ValueError(f"Evaluate.tasks: two tasks share a name: {[t.name for t in tasks]}")
        self.tasks, self.every_n, self.at_fit_end = list(tasks), every_n_validations, at_fit_end
        self.n_samples, self.plot, self.at_fit_start = samples, plot, at_fit_start
        self.active: list[EvalTask] = list(tasks)  # the tasks whose files were found (``setup``)
        self.validations = 0
        self.history: list[tuple[int, dict[str, float]]] = []
        self._last_step: Optional[int] = None

    # state rides in checkpoints, so a resumed run keeps its cadence and its plotted history
    def state_dict(self) -> dict:
        return {"validations": self.validations, "history": [[s, m] for s, m in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.validations = state.get("validations", 0)
        self.history = [(int(s), dict(m)) for s, m in state.get("history", [])]

    def setup(self, trainer, pl_module, stage: str) -> None:
        shapes_dir = getattr(trainer.datamodule, "shapes_dir", None) if trainer.datamodule is not None else None
        self.active = []
        for task in self.tasks:
            try:
                task.setup(shapes_dir)
            except ShapesWorldMissing as e:
                log.warning("Evaluate: %s; %s is left out of this run", e, type(task).__name__)
                continue
            self.active.append(task)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.every_n and self.validations % self.every_n == 0:
            self.evaluate(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.at_fit_start and trainer.global_step == 0 and not self.history:  # a resumed run has its baseline
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # on_train_end, not on_fit_end: the strategy has not torn down yet (model on its device, ranks connected)
        if self.at_fit_end and self._last_step != trainer.global_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, module) -> dict[str, float]:
        """Run every task, gather, log; returns the scalars (the same on every rank)."""
        if not self.active:
            return {}
        rank, world = trainer.global_rank, trainer.world_size
        t0 = time.perf_counter()
        modes = {name: m.training for name, m in module.named_modules()}
        module.eval()
        scalars: dict[str, float] = {}
        tables: dict[str, list] = {}
        try:
            with torch.no_grad():
                for task in self.active:
                    results = gather_results(task.run(module, rank, world), world)
                    scalars.update({f"eval/{k}": float(v) for k, v in task.metrics(results).items()})
                    tables[task.name] = task.samples(results, self.n_samples) if self.n_samples else []
        finally:
            for name, m in module.named_modules():
                m.training = modes[name]
        scalars["eval/seconds"] = time.perf_counter() - t0
        step = trainer.global_step
        self._last_step = step
        self.history.append((step, scalars))
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        if trainer.is_global_zero:
            self._log(trainer, step, scalars, tables)
        return scalars

    def _log(self, trainer, step: int, scalars: dict[str, float], tables: dict[str, list]) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        log.info("evaluation at step %d (%.1f s): %s", step, scalars["eval/seconds"],
                 ", ".join(f"{k[5:]} {v:.3f}" for k, v in scalars.items() if k != "eval/seconds"))
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if not isinstance(logger, TensorBoardLogger):
                continue
            for name, rows in tables.items():
                if rows:
                    logger.experiment.add_text(f"eval/{name}/samples", markdown_table(rows), global_step=step)
            if self.plot and self.active:
                logger.experiment.add_figure("eval/history", history_figure(self.history, self.active),
                                             global_step=step, close=True)
