"""SeVa preference pairs: the model's answer on the clean image (chosen) against its answer on an augmented one.

    python data_prep/seva_pairs.py --model runs/sft/export --prompts "data/shapes/prompts/train-*.tar" \
        --out data/seva/seva-%06d.tar --augment diffusion --t 800 [--max-new-tokens 64 --batch-size 32 \
        --seed 0 --limit N]
    python data_prep/seva_pairs.py ... --augment moco          # PIL-level augmentation (also byol, simclr, ...)

One process per GPU: give each its own ``--prompts`` shards and ``--out`` pattern.

SeVa (Zhu et al., "Self-Supervised Visual Preference Alignment", arXiv 2404.10501,
https://github.com/Kevinz-code/SeVa) needs no labels: the model being aligned answers every prompt greedily
twice, once on the clean image and once on an augmented image; the clean answer is chosen, the augmented one
rejected. Pairs whose two answers are identical after removing ``</s>`` and newlines teach nothing and are dropped
(``same_answer``). Augmentations come from ``data_prep/augment.py``: ``diffusion`` adds the forward-diffusion
noise of step ``--t`` (of 1000) to the processed, CLIP-normalised pixel tensor, as SeVa and POVID do; the other
names (``moco``, ``byol``, ``simclr``, single ops) transform the PIL image before the image processor. Every
record's augmentation is seeded from ``--seed`` and its id, so the output is deterministic and does not depend
on ``--batch-size``.

SeVa's prompts were OCR-VQA questions with the suffix "Answer the question using a single word or phrase."
removed (``--strip-suffix``, on by default; ``--strip-suffix ""`` keeps prompts as they are) and TextVQA caption
prompts. SeVa generated up to 512 new tokens with LLaVA-1.5-7B; raise ``--max-new-tokens`` to match.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from typing import Optional, Sequence

import torch

import augment  # data_prep/augment.py, beside this script
from vlalign.data.schema import PreferenceRecord, PromptRecord
from vlalign.data.shards import ShardWriter
from vlalign.generation import (Sampling, View, add_runtime_args, as_prompt, count_samples, generate_views, load_model,
                                model_fingerprint, prompt_encode, read_samples, record_seed, report)

OCRVQA_SUFFIX = "Answer the question using a single word or phrase."


def same_answer(a: str, b: str) -> bool:
    """SeVa's filter: equal once ``</s>`` and newlines are removed (and the ends stripped)."""
    def norm(s):
        return s.replace("</s>", "").replace("\n", "").strip()

    return norm(a) == norm(b)


def strip_suffix(record: PromptRecord, suffix: str) -> PromptRecord:
    """The record with ``suffix`` (and the whitespace before it) removed from the end of its last user turn."""
    if not suffix:
        return record
    turns = [dict(t) for t in record.prompt]
    last = max(i for i, t in enumerate(turns) if t["role"] == "user")
    text = turns[last]["content"].rstrip()
    if text.endswith(suffix):
        turns[last]["content"] = text[: -len(suffix)].rstrip()
    return PromptRecord(record.id, turns, record.answer, record.objects, record.meta)


def augmentation_view(name: str, t: int, seed: int, max_new_tokens: int) -> View:
    """Greedy decoding on images augmented by ``name`` from augment.py's tables, seeded per record.

    PIL-level ops run on the images before the image processor; pixel-level ones (``diffusion``, at step ``t``)
    on the processed tensor.
    """
    sampling = Sampling(max_new_tokens)
    if augment.space(name) == "pixels":
        op = augment.PIXEL_AUGMENTATIONS[name]

        def noisy(pixels: torch.Tensor, record_id: str) -> torch.Tensor:
            return op(pixels, t, torch.Generator().manual_seed(record_seed(seed, record_id, f"{name}{t}")))

        return View(sampling, pixel_transform=noisy)
    op = augment.AUGMENTATIONS[name]

    def augmented(images: list, record_id: str) -> list:
        rng = random.Random(record_seed(seed, record_id, name))
        return [op(im, rng) for im in images]

    return View(sampling, image_transform=augmented)


def seva_pair(record: PromptRecord, clean: str, augmented: str, meta: Optional[dict] = None) -> Optional[PreferenceRecord]:
    """chosen = the clean-image answer, rejected = the augmented-image answer; None when they are the same."""
    if same_answer(clean, augmented) or not clean.strip() or not augmented.strip():
        return None
    return PreferenceRecord(f"seva-{record.id}", record.prompt, clean, augmented,
                            meta={**record.meta, "method": "seva", **(meta or {})})


def run(args) -> dict:
    bb = load_model(args.model, dtype=args.dtype, device=args.device)
    encode = prompt_encode(bb, args.max_length)
    model_name = model_fingerprint(args.model)
    views = {"clean": View(Sampling(args.max_new_tokens)),
             "augmented": augmentation_view(args.augment, args.t, args.seed, args.max_new_tokens)}
    info = {"augmentation": args.augment, "model": model_name, "seed": args.seed}
    if augment.space(args.augment) == "pixels":
        info["t"] = args.t
    skipped, dropped = Counter(), Counter()
    kept = 0
    total = args.limit if args.limit is not None else count_samples(args.prompts)
    samples = ((strip_suffix(as_prompt(r), args.strip_suffix), ims)
               for r, ims in read_samples(args.prompts, args.limit, skipped))
    with ShardWriter(args.out, max_count=args.shard_size) as writer:
        for record, images, texts in generate_views(bb, samples, views, encode, args.batch_size, seed=args.seed,
                                                    skipped=skipped, progress=args.progress, total=total,
                                                    desc=f"seva pairs ({args.augment})"):
            pair = seva_pair(record, texts["clean"], texts["augmented"], info)
            if pair is None:
                dropped["identical" if same_answer(texts["clean"], texts["augmented"]) else "empty"] += 1
                continue
            writer.write(pair, images)
            kept += 1
    summary = {"kept": kept, "dropped": dict(dropped), "skipped": dict(skipped), **info, "shards": writer.paths}
    summary["read"] = kept + sum(dropped.values()) + sum(skipped.values())
    return report(summary, args.summary)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model being aligned: an export dir or merged checkpoint")
    p.add_argument("--prompts", required=True, help="prompt shards (paths, globs, {a..b}, dirs); any record kind")
    p.add_argument("--out", required=True, help="output shard pattern, e.g. out/seva-%%06d.tar")
    p.add_argument("--augment", default="diffusion", choices=sorted(augment.PIXEL_AUGMENTATIONS) +
                   sorted(augment.AUGMENTATIONS), help="an augmentation of data_prep/augment.py")
    p.add_argument("--t", type=int, default=500, help="diffusion step, 0-999 (SeVa: 500 or 800)")
    p.add_argument("--strip-suffix", default=OCRVQA_SUFFIX, help="removed from the end of prompts ('' keeps them)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length (SeVa: 512)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=1024, help="longest prompt in tokens (image tokens included)")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentations")
    p.add_argument("--limit", type=int, default=None, help="read at most this many prompts")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per output shard")
    add_runtime_args(p, summary=True)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
