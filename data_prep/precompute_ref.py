"""Store the reference model's log-probs in preference shards, so DPO trains with ``reference: precomputed``.

    python data_prep/precompute_ref.py --model runs/sft/export --in "data/pairs/train-*.tar" \
        --out data/pairs_ref/ref-%06d.tar [--batch-size 16 --max-length 512 --layout packed --keep-unscored]

One process per GPU: give each its own ``--in`` shards and ``--out`` pattern.

mllm-dpo's way of training DPO without a reference model in memory: each preference record gets

    "ref_logps": {"model": "<dir name>@<hash>",
                  "chosen":   {"sum": log pi_ref(y_w|x), "mean": sum / tokens, "tokens": n_w},
                  "rejected": {...},
                  "candidates": [{...}, ...]}          # one per ranked candidate, when the record has them

computed exactly as the DPO module's online reference does: the training pipeline's ``Encode(format="pairs")``
(chat template, EOS after each response, image tokens), ``collate_pairs`` and ``pair_logps``, in eval mode,
without gradients, in float32. ``tokens`` is the response length the training pipeline counts (EOS included);
``Encode`` refuses stored log-probs whose token count differs (another tokenizer or template) or whose response
it would truncate, so a record whose prompt + response exceeds ``--max-length`` (use the training value) is not
scored. Images are copied byte for byte.

Records that cannot be scored (not a preference record, too long, unencodable) are counted; they are dropped,
or written without ``ref_logps`` (otherwise unchanged) with ``--keep-unscored``. Existing ``ref_logps`` are replaced.
Shards are read as training reads them (the project's tar reader, allow-listed decoding, images bounded by
``--max-image-pixels`` before decoding): a bad sample or a damaged shard (truncated, corrupt header, unreadable)
never stops the run; it is counted in ``unscored`` under its reason (``shard_truncated``, ``shard_corrupt``,
``bad_image``, ``image_too_large``, ...), the first of each reason is printed with shard and key, it is never
written, and every good sample around it is still scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import replace
from typing import Iterator, Optional, Sequence

import torch

from vlalign.data.chat import Encoder
from vlalign.data.collate import PairExample, collate_pairs, to_device
from vlalign.data.pipeline import Encode
from vlalign.data.schema import LogProb, PreferenceRecord
from vlalign.data.shards import (DEFAULT_MAX_PIXELS, SampleError, ShardWriter, decode_sample, expand_urls,
                                 image_members, iter_shard)
from vlalign.generation import add_runtime_args, batched, count_samples, load_model, model_fingerprint, report
from vlalign.logps import pair_logps

UNLIMITED = 1 << 30


def pair_encoders(backbone, max_candidates: int = 16) -> dict[int, Encode]:
    """``Encode(format="pairs")`` per number of responses, with no truncation (lengths are checked separately)."""
    encoder = Encoder(backbone.tokenizer, backbone.processor.chat_template, backbone.num_image_tokens)
    return {k: Encode(encoder, backbone.processor.image_processor, "pairs", UNLIMITED, num_responses=k)
            for k in range(2, max_candidates + 1)}


def encode_record(encoders: dict[int, Encode], record, images, max_length: int) -> dict[str, PairExample]:
    """The examples to score for one record: ``pair`` (chosen, rejected) and, with candidates, ``candidates``.

    Raises ``SampleError`` (reason ``wrong_kind``, ``too_long``, ``too_many_candidates`` or the encoder's).
    """
    if not isinstance(record, PreferenceRecord):
        raise SampleError("wrong_kind", f"a {record.kind} record is not a preference pair")
    bare = replace(record, ref_logps=None)  # old log-probs (maybe of another model) must not be checked
    out = {"pair": encoders[2](bare, images)}
    cands = record.candidates
    if cands:
        if len(cands) not in encoders:
            raise SampleError("too_many_candidates", f"{len(cands)} candidates (at most {max(encoders)})")
        if len(cands) == 2:  # k = 2 encodes chosen/rejected: point them at the two candidates
            out["candidates"] = encoders[2](replace(bare, chosen=cands[0], rejected=cands[1]), images)
        else:
            out["candidates"] = encoders[len(cands)](bare, images)
    for ex in out.values():
        # the training pipeline truncates a response past max_length and then refuses stored log-probs
        if len(ex.prompt) + max(len(r) for r in ex.responses) > max_length:
            raise SampleError("too_long", f"prompt + response exceed max_length {max_length}")
    return out


@torch.no_grad()
def score(backbone, examples: list[PairExample], layout: str = "packed") -> list[list[LogProb]]:
    """Reference log-probs of every response of every example (examples share their number of responses)."""
    batch = collate_pairs(examples, backbone.tokenizer.pad_token_id, layout=layout)
    device = next(backbone.parameters()).device
    batch = to_device(batch, device)
    out = pair_logps(backbone, batch)
    s, m, n = out.sum.double().cpu().tolist(), out.mean.double().cpu().tolist(), out.tokens.cpu().tolist()
    return [[LogProb(s[b][i], m[b][i], int(n[b][i])) for i in range(len(s[b]))] for b in range(len(examples))]


def read_raw(urls, limit: Optional[int]) -> Iterator[dict | SampleError]:
    """The raw samples of local shards in order (``iter_shard``), and in their place a ``SampleError`` for each bad
    sample or damaged part of a shard (truncated, corrupt header, unreadable): never raises for bad data.
    ``limit`` counts both: the first ``limit`` items read."""
    paths = expand_urls(urls)
    if not paths:
        raise FileNotFoundError(f"no shards match {urls!r}")
    n = 0
    for url in paths:
        for item in iter_shard(url):
            if limit is not None and n >= limit:
                return
            n += 1
            yield item


def _write(writer: ShardWriter, obj: dict, raw: dict):
    images = image_members(raw)
    # the image bytes unchanged, under their own extension
    writer.write(obj, [data for _, data in images], image_format=images[0][0] if images else None)


def run(args) -> dict:
    from tqdm.auto import tqdm

    bb = load_model(args.model, dtype="float32", device=args.device)
    encoders = pair_encoders(bb, args.max_candidates)
    name = args.model_name or model_fingerprint(args.model)
    unscored, scored, kept_unscored = Counter(), 0, 0
    total = args.limit if args.limit is not None else count_samples(args.inputs)
    bar = tqdm(total=total, desc="reference log-probs", unit="record", disable=not args.progress, dynamic_ncols=True)
    with ShardWriter(args.out, max_count=args.shard_size) as writer:
        for chunk in batched(read_raw(args.inputs, args.limit), args.batch_size):
            rows = []  # (raw, record or None, examples or None)
            for raw in chunk:
                record = None
                try:
                    if isinstance(raw, SampleError):  # a bad sample or a damaged shard, as the reader met it
                        raise raw
                    record, images = decode_sample(raw, max_pixels=args.max_image_pixels)
                    rows.append((raw, record, encode_record(encoders, record, images, args.max_length)))
                except SampleError as e:
                    if not unscored[e.reason]:
                        print(f"not scored ({e.reason}): {e} (further '{e.reason}' records are counted, not "
                              "printed)", file=sys.stderr)
                    unscored[e.reason] += 1
                    rows.append((raw, record, None))  # record None: undecodable, never written
            # one forward per group of examples with the same number of responses
            results: dict[tuple[int, str], list[LogProb]] = {}
            groups: dict[int, list[tuple[int, str, PairExample]]] = {}
            for i, (_, _, exs) in enumerate(rows):
                for what, ex in (exs or {}).items():
                    groups.setdefault(len(ex.responses), []).append((i, what, ex))
            for items in groups.values():
                for part in batched(items, args.batch_size):
                    for (i, what, _), lps in zip(part, score(bb, [ex for _, _, ex in part], args.layout)):
                        results[(i, what)] = lps
            for i, (raw, record, exs) in enumerate(rows):
                if exs is None:
                    if args.keep_unscored and record is not None:
                        obj = json.loads(raw["json"])
                        obj.pop("ref_logps", None)  # stale log-probs of another model would pass for ours
                        _write(writer, obj, raw)
                        kept_unscored += 1
                    continue
                chosen, rejected = results[(i, "pair")]
                ref = {"model": name, "chosen": chosen, "rejected": rejected}
                if "candidates" in exs:
                    ref["candidates"] = results[(i, "candidates")]
                _write(writer, replace(record, ref_logps=ref).to_json(), raw)
                scored += 1
            bar.update(len(chunk))
            bar.set_postfix(scored=scored, unscored=sum(unscored.values()))
    bar.close()
    summary = {"scored": scored, "unscored": dict(unscored), "written_unscored": kept_unscored, "model": name,
               "max_length": args.max_length, "shards": writer.paths}
    return report(summary)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the reference model: an export dir or merged checkpoint")
    p.add_argument("--in", dest="inputs", required=True, help="preference shards (paths, globs, {a..b}, dirs)")
    p.add_argument("--out", required=True, help="output shard pattern, e.g. out/ref-%%06d.tar")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512,
                   help="the training max_length: longer prompt + response pairs are not scored")
    p.add_argument("--layout", default="packed", choices=("packed", "plain"), help="as the DPO config's layout")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest image (width x height) read; checked from the header before decoding, larger "
                   "ones are counted as image_too_large (use the training data.max_image_pixels)")
    p.add_argument("--max-candidates", type=int, default=16, help="records with more candidates are not scored")
    p.add_argument("--keep-unscored", action="store_true", help="write unscorable records unchanged")
    p.add_argument("--model-name", default=None, help="ref_logps.model (default: dir name @ weights hash)")
    p.add_argument("--limit", type=int, default=None, help="read at most this many records")
    p.add_argument("--shard-size", type=int, default=1000, help="records per output shard")
    add_runtime_args(p, dtype=False)  # reference log-probs are computed in float32
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
