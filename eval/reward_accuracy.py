"""Reward-model accuracy on held-out preference shards: how often the chosen response is scored above the rejected.

    python eval/reward_accuracy.py --reward-model runs/reward/export --shards "data/shapes/preference/val-*.tar" \
        [--out reward_metrics.json --batch-size 16 --max-length 512]

The reward model is a ``RewardModule`` export directory (``merged/`` + ``value_head.safetensors``), loaded with
``RewardScorer.load``; pairs are encoded and batched by the training pipeline (``ShardDataModule``, ``pairs``
format, packed layout), so the rewards are the ones validation computes. Reports

    accuracy      = mean_i [ r(x_i, y_w) > r(x_i, y_l) ]       (ties count as wrong, as in RewardModule)
    margin_mean   = mean_i  r(x_i, y_w) - r(x_i, y_l)
    reward_mean / reward_std over all 2n rewards; chosen_mean, rejected_mean; n;
    skipped (reason -> count) and skipped_total: the samples not scored

plus a 95% percentile-bootstrap interval of the accuracy over pairs (``accuracy_ci``), and with ``--group-by KEY``
(default ``corruption``, what the shapes world's records carry in ``meta``) the accuracy and count per value of
the records' ``meta[KEY]`` (``by_group``; records without the key go under ``"(none)"``).

Shards are read as training reads them: a bad sample or a damaged shard (``bad_image``, ``image_too_large`` over
``--max-image-pixels``, ``identical_pair``, ``too_long``, ``shard_truncated``, ``shard_corrupt``, ...) is skipped,
logged once per reason with shard and key, and counted in ``skipped``; every good pair is still scored. When no
pair at all can be scored the script stops with the counts.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import Optional, Sequence

import torch

from vlalign.data.collate import to_device
from vlalign.data.module import ShardDataModule
from vlalign.data.pipeline import is_accounting
from vlalign.data.schema import RecordError, loads_record
from vlalign.data.shards import DEFAULT_MAX_PIXELS, SampleError, expand_urls, iter_shard
from vlalign.generation import add_runtime_args, count_samples, report
from vlalign.metrics.reward import grouped_accuracy, reward_metrics  # noqa: F401  (the one implementation)


def record_meta(urls: str, key: str) -> dict[str, object]:
    """record id -> ``meta[key]`` of every valid record in the shards (the ``.json`` members, validated as training
    validates them; images are not decoded). Bad samples and damaged shards are passed over: the scoring pass
    counts them."""
    out = {}
    for path in expand_urls(urls):
        for raw in iter_shard(path):
            if isinstance(raw, SampleError) or "json" not in raw:
                continue
            try:
                record = loads_record(raw["json"])
            except RecordError:
                continue
            out[record.id] = record.meta.get(key, "(none)")
    return out


def run(args) -> dict:
    from tqdm.auto import tqdm

    from vlalign.reward import RewardScorer

    scorer = RewardScorer.load(args.reward_model, dtype=args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    scorer.to(device)
    dm = ShardDataModule(train=args.shards, val=None, batch_size=args.batch_size, max_length=args.max_length,
                         num_workers=0, shuffle_buffer=0, max_image_pixels=args.max_image_pixels)
    dm.attach(scorer.backbone, {"format": "pairs", "layout": "packed", "num_responses": 2})
    chosen, rejected, ids, skipped = [], [], [], Counter()
    bar = tqdm(total=count_samples(args.shards), desc="scoring pairs", unit="pair", disable=not args.progress,
               dynamic_ncols=True)
    for batch in dm.stream("train", shuffle=False, batch_size=args.batch_size):
        batch_skipped = batch.pop("skipped", None) or {}
        skipped.update(batch_skipped)  # every bad sample is reported once, by the batch after it or the last one
        bar.update(sum(batch_skipped.values()))
        batch.pop("stream", None)
        if is_accounting(batch):  # only skips to report (no pair at all could be scored): nothing to score
            continue
        batch = to_device(batch, device)
        rewards = scorer.score_batch(batch).float().cpu()  # (batch, 2)
        ids += [str(i) for i in batch["ids"]]
        chosen += rewards[:, 0].tolist()
        rejected += rewards[:, 1].tolist()
        bar.update(rewards.shape[0])
    bar.close()
    skipped = dict(sorted(skipped.items()))
    if not chosen:
        raise SystemExit(f"no pair of {args.shards} could be scored; skipped {sum(skipped.values())} samples: "
                         + (", ".join(f"{k} {v}" for k, v in skipped.items()) or "none (no samples)"))
    metrics = {**reward_metrics(chosen, rejected, seed=args.seed), "skipped": skipped,
               "skipped_total": sum(skipped.values()), "reward_model": args.reward_model, "shards": args.shards}
    if args.group_by:
        groups = record_meta(args.shards, args.group_by)
        if any(v != "(none)" for v in groups.values()):
            metrics["by_group"] = {args.group_by: grouped_accuracy(ids, chosen, rejected, groups)}
    return report(metrics, args.out, stream=sys.stdout)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward-model", required=True, help="a RewardModule export dir (merged/ + value_head)")
    p.add_argument("--shards", required=True, help="held-out preference shards (paths, globs, {a..b}, dirs)")
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512, help="as in training; longer pairs are truncated")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="largest image (width x height) read, checked before decoding (as data.max_image_pixels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap interval")
    p.add_argument("--group-by", default="corruption",
                   help="also report accuracy per value of this record meta key ('' for none)")
    add_runtime_args(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
