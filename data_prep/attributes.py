"""mllm-dpo's graded-attribute rules: DPO pairs, rejection sampling and SteerLM data from graded candidates.

    python data_prep/attributes.py --in "data/graded/train-*.tar" --out data/attributes [--seed 0 --shard-size 1000]

writes three shard sets from preference shards whose records carry ``candidates`` and ``scores`` (one object per
candidate with the five attributes graded 0-4: helpfulness, correctness, coherence, complexity, verbosity)::

    OUT/dpo/dpo-%06d.tar                   preference records, one per group, by the pair rule below
    OUT/rejection_sampling/rs-%06d.tar     sft records: the prompt and the best-scored candidate
    OUT/steerlm/steerlm-%06d.tar           sft records: every candidate, its prompt stating its own five grades

and prints a summary (records and groups read, pairs made, what was skipped and why: ``spread_below_2`` groups
still give rejection-sampling and SteerLM records). Images are copied byte for byte. Runs on
CPU in seconds; for many shards run one process per subset of ``--in`` with its own ``--out``.

mllm-dpo (Li, Lin, Pei, "Multi-modal Preference Alignment Remedies Degradation of Visual Instruction Tuning on
Language Models", ACL 2024, https://github.com/findalexli/mllm-dpo) graded ~4 answers per VQA prompt with Gemini:

- DPO pair: ``score = helpfulness + correctness + coherence``; a group whose scores span less than 2 is skipped;
  chosen = the best (the first of equals), rejected = a random candidate scoring at most ``max - 2``.
- Rejection sampling: SFT on the best-scored candidate of every group (the first of equals), spread or not.
- SteerLM (Dong et al., arXiv 2310.05344): SFT on every candidate, the prompt stating the candidate's grades; at
  inference every target is 4 (``STEERLM_INFERENCE_TARGETS``). The seed's exact prompt text is not published in
  its README; ours appends to the last user turn, after a newline::

      Answer in the following attributes in 5-point Likert scale: Helpfulness: 4, Correctness: 4, Coherence: 4,
      Complexity: 4, Verbosity: 4

The input ``candidates`` need not be ranked; only ``scores`` decide. Records without candidates and scores, and
records whose scores are malformed, are counted and skipped. Shards are read as training reads them (the
project's tar reader, allow-listed decoding, images bounded by ``--max-image-pixels`` before decoding): a bad
sample or a damaged shard (truncated, corrupt header, unreadable) is counted as ``bad_sample:<reason>``
(``bad_sample:shard_truncated``, ``bad_sample:bad_image``, ...), the first of each reason printed with shard and
key, and every good sample around it is still used. Every group's random draw is seeded from ``--seed``
and its id, so the output does not depend on the order or split of the input.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from typing import Optional, Sequence

from vlalign.data.schema import PreferenceRecord, SFTRecord
from vlalign.data.shards import (DEFAULT_MAX_PIXELS, SampleError, ShardWriter, decode_sample, expand_urls,
                                 image_members, iter_shard)

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
PAIR_ATTRIBUTES = ("helpfulness", "correctness", "coherence")  # summed into the pair rule's score
MIN_SPREAD = 2
STEERLM_INFERENCE_TARGETS = {a: 4 for a in ATTRIBUTES}


def _grade(scores: dict, name: str) -> int:
    value = scores.get(name) if isinstance(scores, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 4 or value != int(value):
        raise ValueError(f"'{name}' must be a whole number 0-4, got {value!r}")
    return int(value)


def overall_score(scores: dict) -> int:
    """mllm-dpo's score of one candidate: helpfulness + correctness + coherence (0-12)."""
    return sum(_grade(scores, a) for a in PAIR_ATTRIBUTES)


def pair_indices(scores: Sequence[dict], rng: random.Random) -> Optional[tuple[int, int]]:
    """``(chosen, rejected)`` indices by the pair rule, or None when the scores span less than ``MIN_SPREAD``."""
    totals = [overall_score(s) for s in scores]
    best = max(totals)
    if best - min(totals) < MIN_SPREAD:
        return None
    chosen = totals.index(best)
    rejected = rng.choice([i for i, t in enumerate(totals) if t <= best - MIN_SPREAD])
    return chosen, rejected


def dpo_pair(candidates: Sequence[str], scores: Sequence[dict], rng: random.Random) -> Optional[tuple[str, str]]:
    """``(chosen, rejected)`` texts by mllm-dpo's rule (see the module docstring), or None to skip the group."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    pair = pair_indices(scores, rng)
    return None if pair is None else (candidates[pair[0]], candidates[pair[1]])


def best_index(scores: Sequence[dict]) -> int:
    totals = [overall_score(s) for s in scores]
    return totals.index(max(totals))


def rejection_sampling_sft(candidates: Sequence[str], scores: Sequence[dict]) -> str:
    """The response rejection sampling trains on: the best-scored candidate (the first of equals)."""
    if len(candidates) != len(scores):
        raise ValueError(f"{len(candidates)} candidates but {len(scores)} scores")
    return candidates[best_index(scores)]


def steerlm_prompt(question: str, targets: dict) -> str:
    """``question`` with the SteerLM attribute request appended (all five attributes, whole numbers 0-4)."""
    grades = ", ".join(f"{a.capitalize()}: {_grade(targets, a)}" for a in ATTRIBUTES)
    return f"{question}\nAnswer in the following attributes in 5-point Likert scale: {grades}"


# ------------------------------------------------------------------------------------------------ shard CLI
def _with_last_user(turns: list[dict], fn) -> list[dict]:
    turns = [dict(t) for t in turns]
    last = max(i for i, t in enumerate(turns) if t["role"] == "user")
    turns[last]["content"] = fn(turns[last]["content"])
    return turns


def group_records(record: PreferenceRecord, rng: random.Random) -> tuple[dict, str]:
    """The records one group gives: ``{"dpo": [...], "rejection_sampling": [...], "steerlm": [...]}`` plus the
    reason DPO skipped it ("" when a pair was made). Raises ``ValueError`` for malformed scores."""
    cands, scores = record.candidates, record.scores
    grades = [{a: _grade(s, a) for a in ATTRIBUTES} for s in scores]  # all five, checked before anything is made
    totals = [overall_score(g) for g in grades]
    meta = dict(record.meta)
    out: dict = {"dpo": [], "rejection_sampling": [], "steerlm": []}
    pair = pair_indices(scores, rng)
    if pair is not None:
        i, j = pair
        ref = None
        if record.ref_logps and len(record.ref_logps.get("candidates") or []) == len(cands):
            refs = record.ref_logps["candidates"]
            ref = {"model": record.ref_logps["model"], "chosen": refs[i], "rejected": refs[j]}
        out["dpo"].append(PreferenceRecord(
            record.id, record.prompt, cands[i], cands[j], ref_logps=ref,
            meta={**meta, "method": "mllm-dpo", "chosen_index": i, "rejected_index": j,
                  "chosen_score": totals[i], "rejected_score": totals[j]}))
    best = best_index(scores)
    out["rejection_sampling"].append(SFTRecord(
        record.id, record.prompt + [{"role": "assistant", "content": cands[best]}],
        {**meta, "method": "rejection_sampling", "index": best, "score": totals[best]}))
    for k, (text, g) in enumerate(zip(cands, grades)):
        prompt = _with_last_user(record.prompt, lambda q: steerlm_prompt(q, g))
        out["steerlm"].append(SFTRecord(f"{record.id}-c{k}", prompt + [{"role": "assistant", "content": text}],
                                        {**meta, "method": "steerlm", "index": k, "targets": g}))
    return out, "" if pair is not None else "spread_below_2"


def _write(writer: ShardWriter, record, images: list[tuple[str, bytes]]):
    # the writer names image members by its image_format: give it this sample's own, so bytes keep their name
    writer.image_format = images[0][0] if images else writer.image_format
    writer.write(record, [data for _, data in images])


def read_items(paths: Sequence[str]):
    """Raw samples of local shards in order, and a ``SampleError`` in place of each bad sample or damaged part of a
    shard (``iter_shard``: truncated, corrupt header, unreadable; never raises for bad data)."""
    for url in paths:
        yield from iter_shard(url)


def run(args) -> dict:
    from tqdm.auto import tqdm

    paths = expand_urls(args.inputs)
    if not paths:
        raise FileNotFoundError(f"no shards match {args.inputs!r}")
    names = {"dpo": "dpo", "rejection_sampling": "rs", "steerlm": "steerlm"}
    writers = {k: ShardWriter(os.path.join(args.out, k, f"{v}-%06d.tar"), max_count=args.shard_size)
               for k, v in names.items()}
    read, groups, skipped, written = 0, 0, Counter(), Counter()
    try:
        for raw in tqdm(read_items(paths), desc="attribute groups", unit="record", disable=not args.progress):
            read += 1
            try:
                if isinstance(raw, SampleError):
                    raise raw
                record, _ = decode_sample(raw, max_pixels=args.max_image_pixels)
            except SampleError as e:
                tag = f"bad_sample:{e.reason}"
                if not skipped[tag]:
                    print(f"skipping a sample ({e.reason}): {e} (further '{e.reason}' samples are counted, not "
                          "printed)", file=sys.stderr)
                skipped[tag] += 1
                continue
            if not isinstance(record, PreferenceRecord):
                skipped["not_preference"] += 1
                continue
            if not record.candidates or not record.scores:
                skipped["no_scores"] += 1
                continue
            groups += 1
            try:
                out, reason = group_records(record, random.Random(f"{args.seed}/{record.id}"))
            except ValueError as e:
                skipped["bad_scores"] += 1
                print(f"{raw.get('__url__')} key {raw.get('__key__')}: {e}", file=sys.stderr)
                continue
            if reason:
                skipped[reason] += 1
            images = image_members(raw)
            for kind, records in out.items():
                for r in records:
                    _write(writers[kind], r, images)
                    written[kind] += 1
    finally:
        for w in writers.values():
            w.close()
    summary = {"records_read": read, "groups_read": groups, "pairs": written["dpo"], "skipped": dict(skipped),
               "rejection_sampling": written["rejection_sampling"], "steerlm": written["steerlm"],
               "seed": args.seed, "shards": {k: w.paths for k, w in writers.items()}}
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return summary


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inputs", required=True, help="preference shards with candidates + scores "
                   "(paths, globs, {a..b} ranges, directories)")
    p.add_argument("--out", required=True, help="output directory; gets dpo/, rejection_sampling/, steerlm/")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of rejected candidate, per group")
    p.add_argument("--shard-size", type=int, default=1000, help="records per output shard")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest image (width x height) read; checked from the header before decoding, larger "
                   "ones are skipped as bad_sample:image_too_large (use the training data.max_image_pixels)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
