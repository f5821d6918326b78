"""Answer evaluation prompts with a trained model: batched greedy generation to an answers JSON-lines file.

    python eval/generate.py --model runs/dpo/export --questions data/shapes/eval/pope_random.jsonl \
        --image-root data/shapes/eval/images --out answers/pope_random.jsonl [--batch-size 32 --max-new-tokens 64]
    python eval/generate.py --model runs/dpo/export --questions data/shapes/eval/captions_prompts.jsonl \
        --image-root data/shapes/eval/images --out answers/captions.jsonl --max-new-tokens 128
    python eval/generate.py --model runs/dpo/export --shards "data/shapes/prompts/test-*.tar" --out answers.jsonl

Then score with ``eval/pope.py --answers`` or ``eval/chair.py --captions``. For several GPUs, split the question
file and run one process per GPU (``CUDA_VISIBLE_DEVICES``), then concatenate the outputs.

Inputs:

* ``--questions`` JSON lines with an id, an image file name (under ``--image-root``) and the prompt ``text``:
  POPE questions ``{"question_id", "image", "text", "label"}`` or caption prompts ``{"image_id", "image",
  "text"}``. Each output line carries the input's id under the same key: ``{"question_id": 7, "text": "No."}``
  or ``{"image_id": "...", "text": "A red circle."}``, in input order.
* ``--shards`` prompt records (any record kind: its prompt); each output line is ``{ID_KEY: record id,
  "text"}`` (``--id-key``, default ``question_id``, which both scorers read).

The model is an export directory (``merged/``) or a merged checkpoint (see ``vlalign.generation``). Decoding is
greedy (SeVa's and LLaVA's POPE protocol) unless ``--temperature`` is above 0. ``--prompt-suffix`` is appended
to every prompt as given (LLaVA's POPE file appends "\\nAnswer the question using a single word or phrase.").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Iterator, Optional, Sequence

from PIL import Image

from vlalign.data.schema import PromptRecord
from vlalign.generation import (Sampling, View, add_runtime_args, count_samples, generate_views, load_model,
                                prompt_encode, read_samples)

ID_KEYS = ("question_id", "image_id")


def id_key(item: dict) -> str:
    """The id field of a question line: ``question_id`` (POPE) or ``image_id`` (caption prompts)."""
    for k in ID_KEYS:
        if k in item:
            return k
    raise ValueError(f"a question needs one of {ID_KEYS}: {json.dumps(item)[:120]}")


def question_samples(path: str, image_root: str, limit: Optional[int] = None) -> Iterator[tuple[PromptRecord, list]]:
    """``(prompt record, [image])`` per question line; the record's meta keeps the id key and value."""
    with open(path) as f:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            q = json.loads(line)
            key = id_key(q)
            images = []
            if q.get("image"):
                with Image.open(os.path.join(image_root, q["image"])) as im:
                    images = [im.convert("RGB")]
            yield PromptRecord(str(q[key]), [{"role": "user", "content": q["text"]}],
                               meta={"id_key": key, "id": q[key]}), images


def count_lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def run(args) -> dict:
    if bool(args.questions) == bool(args.shards):
        raise SystemExit("give exactly one of --questions and --shards")
    bb = load_model(args.model, dtype=args.dtype, device=args.device)
    encode = prompt_encode(bb, args.max_length, args.prompt_suffix)
    sampling = Sampling(args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                        top_p=args.top_p)
    skipped: Counter = Counter()
    if args.questions:
        samples = question_samples(args.questions, args.image_root, args.limit)
        total = count_lines(args.questions)
    else:
        samples = read_samples(args.shards, args.limit, skipped)
        total = count_samples(args.shards)
    total = min(total, args.limit) if args.limit is not None else total
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    n = 0
    with open(args.out, "w") as f:
        for record, _, texts in generate_views(bb, samples, {"answer": View(sampling)}, encode, args.batch_size,
                                               seed=args.seed, skipped=skipped, progress=args.progress, total=total,
                                               desc="answering"):
            if "id_key" in record.meta:
                line = {record.meta["id_key"]: record.meta["id"], "text": texts["answer"]}
            else:
                line = {args.id_key: record.id, "text": texts["answer"]}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
    summary = {"answered": n, "skipped": dict(skipped), "out": args.out}
    print(json.dumps(summary), file=sys.stderr)
    return summary


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an export dir (with merged/) or a merged checkpoint dir")
    p.add_argument("--questions", default=None, help="JSON lines with question_id/image_id, image, text")
    p.add_argument("--image-root", default=".", help="directory the questions' image names are relative to")
    p.add_argument("--shards", default=None, help="prompt shards instead of --questions")
    p.add_argument("--id-key", default="question_id", choices=ID_KEYS, help="output id key for --shards")
    p.add_argument("--out", required=True, help="answers JSON lines")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-length", type=int, default=2048, help="longest prompt in tokens (image tokens included)")
    p.add_argument("--prompt-suffix", default="", help="text appended to every prompt, as given")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of sampling (unused when greedy)")
    p.add_argument("--limit", type=int, default=None, help="answer only the first N prompts")
    add_runtime_args(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
