"""Paired bootstrap confidence intervals for before/after comparisons on POPE and CHAIR.

    python eval/stats.py pope --questions coco_pope_random.json coco_pope_adversarial.json \
        --before base_answers.jsonl --after dpo_answers.jsonl [--out stats.json]
    python eval/stats.py chair --vocab coco_synonyms.json --gt coco_objects.json \
        --before base_captions.jsonl --after dpo_captions.jsonl [--out stats.json]

Both models answer the same items, so the uncertainty of the difference comes from which items were drawn:
resample items with replacement (the same items for both sides) and read the interval off the percentiles
of the resampled mean differences (Efron & Tibshirani 1993, ch. 13; Koehn 2004 for paired MT comparisons).
Per-item metrics: POPE correctness and "answered yes" (1/0) per question, CHAIR "has a hallucination" (1/0)
and distinct objects mentioned per caption. Corpus ratios such as CHAIRi are not per-item means and are not
bootstrapped here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence

import numpy as np

import chair
import pope


def paired_bootstrap(before: Sequence[float], after: Sequence[float], n_boot: int = 2000, seed: int = 0,
                     ci: float = 0.95) -> dict:
    """Percentile bootstrap CI of ``mean(after) - mean(before)`` over paired items.

    Args:
        before, after: a per-item metric on the same ``n`` items, aligned.
        n_boot: bootstrap resamples; each draws ``n`` item indices with replacement.
        seed: seed of the numpy generator, so the interval is reproducible.
        ci: coverage of the two-sided interval, ``[q((1-ci)/2), q((1+ci)/2)]`` of the resampled differences.

    Returns:
        ``mean_before``, ``mean_after``, ``diff`` (= mean_after - mean_before), ``ci_low``, ``ci_high``,
        ``n`` and ``ci`` (the coverage asked for).
    """
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"before and after must be 1-D and aligned, got shapes {b.shape} and {a.shape}")
    n = len(b)
    if n == 0:
        raise ValueError("no items to bootstrap")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    d = a - b
    rng = np.random.default_rng(seed)
    # chunks of resamples keep the (chunk, n) index matrix near 32 MB whatever n is
    chunk = max(1, min(n_boot, 4_000_000 // n))
    means = np.concatenate([d[rng.integers(0, n, size=(min(chunk, n_boot - i), n))].mean(axis=1)
                            for i in range(0, n_boot, chunk)])
    low, high = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return {"mean_before": float(b.mean()), "mean_after": float(a.mean()), "diff": float(d.mean()),
            "ci_low": float(low), "ci_high": float(high), "n": n, "ci": ci}


def paired_values(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[list[float], list[float]]:
    """Align two ``item key -> value`` maps; they must cover the same items."""
    if before.keys() != after.keys():
        only_b, only_a = sorted(before.keys() - after.keys()), sorted(after.keys() - before.keys())
        raise ValueError(f"items differ: {len(only_b)} only before (e.g. {only_b[:3]}), "
                         f"{len(only_a)} only after (e.g. {only_a[:3]})")
    keys = list(before)
    return [before[k] for k in keys], [after[k] for k in keys]


def pope_correct(results: Mapping[str, Sequence[dict]]) -> dict[str, float]:
    """``"row/question_id" -> 1.0`` if the parsed answer equals the label, else 0.0 (from ``pope.evaluate``)."""
    return {f"{name}/{it['question_id']}": float(it["pred"] == it["label"])
            for name, items in results.items() for it in items}


def pope_said_yes(results: Mapping[str, Sequence[dict]]) -> dict[str, float]:
    """``"row/question_id" -> 1.0`` if the answer parsed as yes, else 0.0 (from ``pope.evaluate``)."""
    return {f"{name}/{it['question_id']}": float(it["pred"] == "yes")
            for name, items in results.items() for it in items}


def _caption_keys(details: Sequence[dict]) -> list[str]:
    # an image captioned twice gets keys "id", "id#1", ... so pairing goes by occurrence
    seen: dict[str, int] = {}
    keys = []
    for d in details:
        k = seen[d["image_id"]] = seen.get(d["image_id"], -1) + 1
        keys.append(d["image_id"] if k == 0 else f"{d['image_id']}#{k}")
    return keys


def chair_hallucinated(details: Sequence[dict]) -> dict[str, float]:
    """``image_id -> 1.0`` if the caption mentions any hallucinated object (its CHAIRs), from ``chair.evaluate``."""
    return {k: float(bool(d["hallucinated"])) for k, d in zip(_caption_keys(details), details)}


def chair_objects(details: Sequence[dict]) -> dict[str, float]:
    """``image_id -> number of distinct objects mentioned`` in the caption, from ``chair.evaluate``."""
    return {k: float(len(d["mentioned"])) for k, d in zip(_caption_keys(details), details)}


def format_comparison(results: Mapping[str, dict], scale: Mapping[str, float] | None = None,
                      digits: int = 2) -> str:
    """Markdown table of ``metric name -> paired_bootstrap(...)`` results, one row per metric.

    ``scale`` multiplies a metric's numbers for display (e.g. ``{"accuracy": 100}`` for percent).
    """
    scale = scale or {}
    level = {r.get("ci", 0.95) for r in results.values()}
    head = f"{100 * level.pop():g}% CI" if len(level) == 1 else "CI"
    lines = [f"| metric | before | after | diff | {head} | n |", "|---|---:|---:|---:|---|---:|"]
    for name, r in results.items():
        s = scale.get(name, 1.0)
        b, a, d, lo, hi = (s * r[k] for k in ("mean_before", "mean_after", "diff", "ci_low", "ci_high"))
        lines.append(f"| {name} | {b:.{digits}f} | {a:.{digits}f} | {d:+.{digits}f} "
                     f"| [{lo:.{digits}f}, {hi:.{digits}f}] | {r['n']} |")
    return "\n".join(lines)


def compare_pope(question_paths: Sequence[str], before: Sequence[str], after: Sequence[str],
                 n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict[str, dict]:
    """Bootstrap accuracy and yes-ratio per POPE file and pooled: ``"random/accuracy" -> result``, ..."""
    res = {side: pope.evaluate(question_paths, paths) for side, paths in (("before", before), ("after", after))}
    out = {}
    rows = list(res["before"]) + (["all"] if len(res["before"]) > 1 else [])
    for row in rows:
        pick = {side: (r if row == "all" else {row: r[row]}) for side, r in res.items()}
        for metric, fn in (("accuracy", pope_correct), ("yes_ratio", pope_said_yes)):
            b, a = paired_values(fn(pick["before"]), fn(pick["after"]))
            out[f"{row}/{metric}"] = paired_bootstrap(b, a, n_boot, seed, ci)
    return out


def compare_chair(vocab_path: str, gt_path: str, before: str, after: str, n_boot: int = 2000, seed: int = 0,
                  ci: float = 0.95, plurals: bool = True) -> dict[str, dict]:
    """Bootstrap CHAIRs and objects per caption between two caption files on the same images."""
    with open(vocab_path) as f:
        synonyms = json.load(f)
    with open(gt_path) as f:
        gt = json.load(f)
    det = {side: chair.evaluate(chair.load_captions(p), synonyms, gt, plurals)
           for side, p in (("before", before), ("after", after))}
    out = {}
    for metric, fn in (("chair_s", chair_hallucinated), ("objects_per_caption", chair_objects)):
        b, a = paired_values(fn(det["before"]), fn(det["after"]))
        out[metric] = paired_bootstrap(b, a, n_boot, seed, ci)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    sub = p.add_subparsers(dest="task", required=True)
    pp = sub.add_parser("pope", help="accuracy and yes-ratio, per question file and pooled")
    pp.add_argument("--questions", nargs="+", required=True, help="POPE question files (as for eval/pope.py)")
    pp.add_argument("--before", nargs="+", required=True, help="answers before: one file, or one per question file")
    pp.add_argument("--after", nargs="+", required=True, help="answers after: one file, or one per question file")
    pc = sub.add_parser("chair", help="CHAIRs and objects per caption")
    pc.add_argument("--vocab", required=True, help="JSON object: canonical object -> list of synonyms")
    pc.add_argument("--gt", required=True, help="JSON object: image_id -> list of ground-truth objects")
    pc.add_argument("--before", required=True, help="captions before (JSON lines, as for eval/chair.py)")
    pc.add_argument("--after", required=True, help="captions after, on the same images")
    for s in (pp, pc):
        s.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
        s.add_argument("--seed", type=int, default=0, help="resampling seed")
        s.add_argument("--ci", type=float, default=0.95, help="coverage of the interval")
        s.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    try:
        if args.task == "pope":
            results = compare_pope(args.questions, args.before, args.after, args.n_boot, args.seed, args.ci)
            scale = {k: 100.0 for k in results}
        else:
            results = compare_chair(args.vocab, args.gt, args.before, args.after, args.n_boot, args.seed, args.ci)
            scale = {"chair_s": 100.0}
    except ValueError as e:
        p.exit(2, f"error: {e}\n")
    print(format_comparison(results, scale))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
