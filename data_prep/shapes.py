"""Build the embedded "shapes" world: SFT, preference and prompt shards plus the POPE / CHAIR evaluation files.

    python data_prep/shapes.py --out data/shapes                                   # the default world
    python data_prep/shapes.py --out data/shapes_50k --train-images 50000 --seed 1

Training builds the default world on first use (``ShardDataModule.prepare_data`` calls ``ensure_shapes``); run
this to build it ahead of time, at another size, or to look at it. One process on CPU, no GPU, no network; on a
multi-node job run it once on shared storage. A world already at ``--out`` with the same arguments is kept
unless ``--force``. Layout and record contents: ``src/vlalign/data/shapes.py``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from vlalign.data.shapes import build_shapes, ensure_shapes


def summary_table(summary: dict) -> str:
    """Counts per shard set and evaluation file, shard numbers, size on disk and build time."""
    lines = [f"{'set':<24}{'records':>9}{'shards':>8}"]
    for name, n in summary["counts"].items():
        shards = summary["shards"].get(name)
        lines.append(f"{name:<24}{n:>9}{len(shards) if shards else '':>8}")
    lines.append(f"directory: {summary['out_dir']}")
    if "bytes" in summary:
        lines.append(f"size on disk: {summary['bytes'] / 2 ** 20:.1f} MiB, built in {summary['seconds']:.1f} s")
    freq = summary["stats"]["train"]["frequency"]
    total = max(summary["args"]["train_images"], 1)
    lines.append("train images holding each shape: " + ", ".join(f"{s} {100 * c / total:.0f}%"
                                                                 for s, c in freq.items()))
    lines.append("preference corruptions: " + ", ".join(f"{k} {v}" for k, v in
                                                        summary["stats"]["preference_corruptions"].items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--out", default="data/shapes", help="output directory (replaced if it holds a shapes world)")
    p.add_argument("--train-images", type=int, default=5000,
                   help="training images; each gives one sft, one preference and one prompt record")
    p.add_argument("--val-images", type=int, default=300, help="validation images (sft and preference records)")
    p.add_argument("--test-images", type=int, default=500,
                   help="held-out images for prompts/test and the POPE / CHAIR files under eval/")
    p.add_argument("--image-size", type=int, default=48, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical output")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching world is already there")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    kwargs = dict(train_images=args.train_images, val_images=args.val_images, test_images=args.test_images,
                  image_size=args.image_size, seed=args.seed, shard_size=args.shard_size, progress=not args.quiet)
    try:
        summary = build_shapes(args.out, **kwargs) if args.force else ensure_shapes(args.out, **kwargs)
    except (ValueError, FileExistsError) as e:
        p.exit(2, f"error: {e}\n")
    if summary.get("built") is False:
        print(f"{args.out} already holds this world (same arguments and generator version); --force rebuilds it")
    print(summary_table(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
