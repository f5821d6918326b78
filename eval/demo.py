"""End-to-end alignment demo on the embedded default: SFT -> SeVa pairs -> DPO -> POPE and CHAIR, before/after.

    python eval/demo.py                      # about 10-15 minutes on 2 CPU cores; writes runs/demo/report.md
    python eval/demo.py --sft runs/sft/export # reuse an SFT export instead of training one

Steps, all on the synthetic shapes world (a world of its own under ``--out``, with ``--test-images`` held-out
images for evaluation):

1. SFT of the tiny LLaVA from scratch (``conf/sft.yaml``), unless ``--sft`` gives an export;
2. SeVa pairs made by the SFT model itself (``data_prep/seva_pairs.py``): its greedy caption of the clean image is
   chosen, its caption of the diffusion-noised image (step ``--t``) rejected; identical answers are dropped;
3. DPO from the SFT model on those pairs (``conf/dpo.yaml``), and the same DPO with chosen and rejected swapped
   (the control: a real preference effect moves the metrics the opposite way under the swap);
4. the three models answer the held-out POPE questions (random / popular / adversarial) and caption the held-out
   images; POPE accuracy and yes-ratio, CHAIRs and objects per caption are compared with the SFT model on the same
   items (paired bootstrap, 95% intervals); CHAIRi and words per caption are reported beside them, since a
   shorter caption alone lowers CHAIR.

Reruns into the same ``--out``: each training stage lives in its own stable run directory (``OUT/sft``,
``OUT/dpo``, ``OUT/dpo_swapped``: TensorBoard events, ``checkpoints/``, ``export/``) and is started with
``--ckpt_path last``. Rerun with the same settings, a stage resumes: one interrupted (Ctrl-C, a killed job)
continues from its newest complete checkpoint, one that finished only reloads its last checkpoint and exports
again. A stage whose settings changed (its config overrides such as ``--sft-steps``, ``--dpo-steps``, ``--beta``,
or the bytes of the pairs and SFT model it trains from, e.g. after another ``--t``) has its old run directory
deleted and trains from scratch; ``--fresh`` does that for every stage. The shapes world is reused when it
matches, SeVa pairs and the evaluation are recomputed (greedy decoding on CPU: the same pairs for the same model),
and ``report.md`` / ``report.json`` are replaced.

Read the result as a measurement, not a promise: at this scale DPO's effect can be small, and the interval says
whether it is distinguishable from zero. Seen here (2026-11-24, ``python eval/demo.py --sft runs/sft/export`` from
a 1200-step SFT model, 8.5 minutes): the SFT model named 1.8 objects per caption (recall of true objects 46%,
CHAIRs 59.9%) but answered "Yes." to every POPE question (it reads colours and counts, not shape types, at this
budget); its captions changed under diffusion noise for 2958 of 3000 prompts (t = 900). 100 DPO steps on those
pairs collapsed the captions (1.3 words, no objects: CHAIRs 0% is an artefact, not less hallucination), while
the swapped control raised CHAIRs by 8.3 points (95% CI [5.3, 11.4]) and objects per caption by 0.20, and
lowered the POPE yes-ratio to 70% at unchanged accuracy. With ``--dpo-steps 30`` (7.9 minutes): CHAIRs 59.9% ->
24.7% (CI of the difference [-39.7, -30.6]) but objects per caption 1.8 -> 0.4, CHAIRi 41.7% -> 57.7% and recall
46% -> 8.5%; the swapped control went the other way (CHAIRs +9.4 [6.5, 12.5], objects per caption +0.28). So
DPO on these SeVa pairs moves how many objects a caption names, in the direction the pairs say, but does not
lower the hallucination rate per object named: read CHAIRs only together with CHAIRi and objects per caption.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "data_prep"))

import chair  # noqa: E402
import pope  # noqa: E402
import stats  # noqa: E402


def log(msg: str):
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


STAGE_FILE = "demo_stage.json"  # a training stage's settings, in its run directory


def file_digest(paths: Sequence[str]) -> str:
    """A BLAKE2 hash of the bytes of ``paths`` (files, or every file under a directory, in sorted order)."""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
        for name in files:
            h.update(os.path.relpath(name, path).encode() + b"\0")
            with open(name, "rb") as f:
                while block := f.read(1 << 24):
                    h.update(block)
    return h.hexdigest()


def prepare_run_dir(run_dir: str, settings: dict, fresh: bool = False) -> str:
    """Make ``run_dir`` ready for a training stage with ``settings``; returns what the stage will do.

    ``"new"``: no run directory yet. ``"resume"``: the directory holds a run of these very settings (recorded in
    ``STAGE_FILE``), which ``--ckpt_path last`` continues or, if it finished, only re-exports. ``"restart"``: the
    directory holds a run of other settings (or of an older demo, or ``fresh`` was asked): it is deleted first, so
    no checkpoint of another stage is resumed and TensorBoard shows one run per directory.
    """
    stamp = os.path.join(run_dir, STAGE_FILE)
    outcome = "new"
    if os.path.exists(run_dir):
        try:
            with open(stamp) as f:
                same = json.load(f) == settings
        except (OSError, ValueError):
            same = False
        if same and not fresh:
            return "resume"
        shutil.rmtree(run_dir)
        outcome = "restart"
    os.makedirs(run_dir)
    with open(stamp + ".tmp", "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(stamp + ".tmp", stamp)
    return outcome


def train(config: str, run_dir: str, overrides: list[str], inputs: Sequence[str] = (), fresh: bool = False) -> str:
    """``python src/train.py fit --config CONFIG --ckpt_path last`` with everything under ``run_dir`` (its stable
    run directory: TensorBoard events, ``checkpoints/``, ``export/``); returns the export directory.

    A rerun of the demo into the same ``--out`` resumes each stage (see ``prepare_run_dir``): an interrupted stage
    continues from its newest complete checkpoint, a finished one reloads its ``last.ckpt`` and exports again
    (seconds). The stage's settings are its config, ``overrides`` and a hash of ``inputs`` (the shards and model it
    trains from); when they changed, its old run directory is deleted and it trains from scratch.
    """
    name = os.path.basename(run_dir)
    settings = {"config": config, "overrides": overrides, "inputs": file_digest(inputs)}
    outcome = prepare_run_dir(run_dir, settings, fresh)
    log(f"{name}: " + {"new": "training", "resume": "resuming from its last checkpoint (same settings)",
                       "restart": "settings changed (or --fresh): old run directory removed, training anew"}[outcome])
    cmd = [sys.executable, os.path.join(ROOT, "src", "train.py"), "fit", "--config", os.path.join(ROOT, config),
           "--trainer.default_root_dir", run_dir, "--trainer.logger.init_args.save_dir", os.path.dirname(run_dir),
           "--trainer.logger.init_args.name", name, "--trainer.enable_progress_bar", "false",
           "--model.init_args.export_dir", os.path.join(run_dir, "export"),
           *overrides, "--ckpt_path", "last"]
    log(" ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:]))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return os.path.join(run_dir, "export")


def split_pairs(paths: Sequence[str], out: str, val_fraction: float = 0.1) -> tuple[str, str, str, int]:
    """Re-shard SeVa pairs into train / val and a swapped copy of train (the control: chosen and rejected
    exchanged). Returns the three shard paths and the number of training pairs."""
    from vlalign.data.shards import ShardWriter, read_shard

    pairs = [s for path in paths for s in read_shard(path)]
    n_val = max(1, int(len(pairs) * val_fraction))
    if len(pairs) - n_val < 8:
        raise SystemExit(f"only {len(pairs)} SeVa pairs survived the identical-answer filter: raise --t or "
                         "--seva-prompts")
    names = [os.path.join(out, f"{n}-000000.tar") for n in ("train", "val", "swapped")]
    with ShardWriter(os.path.join(out, "train-%06d.tar"), max_count=10**6) as tr, \
            ShardWriter(os.path.join(out, "val-%06d.tar"), max_count=10**6) as va, \
            ShardWriter(os.path.join(out, "swapped-%06d.tar"), max_count=10**6) as sw:
        for i, (record, images) in enumerate(pairs):
            if i >= len(pairs) - n_val:
                va.write(record, images)
                continue
            tr.write(record, images)
            record.chosen, record.rejected = record.rejected, record.chosen
            record.meta = dict(record.meta, swapped=True)
            sw.write(record, images)
    return (*names, len(pairs) - n_val)


def answer(model: str, questions: str, image_root: str, out: str, max_new_tokens: int, batch_size: int):
    import generate

    generate.main(["--model", model, "--questions", questions, "--image-root", image_root, "--out", out,
                   "--max-new-tokens", str(max_new_tokens), "--batch-size", str(batch_size), "--no-progress"])


def evaluate(models: dict[str, str], world: str, work: str, batch_size: int) -> dict:
    ev = os.path.join(world, "eval")
    questions = [os.path.join(ev, f"pope_{s}.jsonl") for s in ("random", "popular", "adversarial")]
    all_q = os.path.join(work, "pope_all.jsonl")
    with open(all_q, "w") as f:  # question ids are unique across the three files: answer them in one pass
        for q in questions:
            f.write(open(q).read())
    files = {}
    for name, model in models.items():
        t = time.time()
        files[name] = {"pope": os.path.join(work, f"{name}_pope.jsonl"), "captions": os.path.join(work, f"{name}_captions.jsonl")}
        answer(model, all_q, os.path.join(ev, "images"), files[name]["pope"], 6, batch_size)
        answer(model, os.path.join(ev, "captions_prompts.jsonl"), os.path.join(ev, "images"), files[name]["captions"], 48,
               batch_size)
        log(f"{name}: answered POPE and captions in {time.time() - t:.0f}s")
    vocab, gt = os.path.join(ev, "chair_vocab.json"), os.path.join(ev, "chair_gt.json")
    synonyms, truth = json.load(open(vocab)), json.load(open(gt))
    report = {"absolute": {}, "paired": {}}
    for name, f in files.items():
        rows = pope.summarise(pope.evaluate(questions, [f["pope"]]))
        det = chair.evaluate(chair.load_captions(f["captions"]), synonyms, truth)
        report["absolute"][name] = {"pope": rows, "chair": chair.chair_metrics(det)}
    for name in files:
        if name == "sft":
            continue
        paired = stats.compare_pope(questions, [files["sft"]["pope"]], [f["pope"] for f in [files[name]]])
        paired.update(stats.compare_chair(vocab, gt, files["sft"]["captions"], files[name]["captions"]))
        report["paired"][name] = paired
    return report


def table(report: dict) -> str:
    names = list(report["absolute"])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label, get, scale=100.0):
        vals = [get(report["absolute"][n]) for n in names]
        lines.append(f"| {label} | " + " | ".join(f"{v * scale:.1f}" for v in vals) + " |")

    for split in ("random", "popular", "adversarial"):
        row(f"POPE {split} accuracy %", lambda r, s=split: r["pope"][s]["accuracy"])
    row("POPE average F1 %", lambda r: r["pope"]["average"]["f1"])
    row("POPE average yes-ratio %", lambda r: r["pope"]["average"]["yes_ratio"])
    row("CHAIRs %", lambda r: r["chair"]["chair_s"])
    row("CHAIRi %", lambda r: r["chair"]["chair_i"])
    row("objects per caption", lambda r: r["chair"]["objects_per_caption"], 1.0)
    row("words per caption", lambda r: r["chair"]["words_per_caption"], 1.0)
    row("recall of true objects %", lambda r: r["chair"]["recall"])
    out = ["Absolute (held-out images; the same items for every model):", "", *lines, ""]
    for name, paired in report["paired"].items():
        out += [f"{name} minus sft, paired bootstrap 95% interval (x100 for rates):", "",
                stats.format_comparison(paired, scale={k: (1.0 if "objects" in k else 100.0) for k in paired}), ""]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="everything the demo writes goes here")
    p.add_argument("--sft", default=None, help="an existing SFT export to start from (skips step 1)")
    p.add_argument("--train-images", type=int, default=5000)
    p.add_argument("--test-images", type=int, default=1000, help="held-out images for POPE and CHAIR")
    p.add_argument("--sft-steps", type=int, default=900, help="SFT steps (the model must learn to look at the image)")
    p.add_argument("--seva-prompts", type=int, default=3000, help="prompts the SFT model answers twice")
    p.add_argument("--augment", default="diffusion")
    p.add_argument("--t", type=int, default=900, help="diffusion step of the rejected view (at 500 the tiny model's "
                   "answers rarely change; the better it is trained, the higher t must be)")
    p.add_argument("--dpo-steps", type=int, default=100, help="kept short: long DPO collapses the captions")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64, help="generation batch size")
    p.add_argument("--no-control", dest="control", action="store_false", help="skip the swapped-pairs control")
    p.add_argument("--fresh", action="store_true", help="train every stage from scratch, deleting its earlier run "
                   "directory under --out (default: a stage rerun with the same settings resumes)")
    args = p.parse_args(argv)

    import torch

    from vlalign.data.shapes import ensure_shapes

    torch.set_num_threads(1)  # the tiny model generates fastest on one thread (no oversubscription on small CPUs)

    start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    world = os.path.join(out, "shapes")
    log(f"shapes world under {world}")
    ensure_shapes(world, train_images=args.train_images, test_images=args.test_images, progress=False)
    data = ["--data.shapes_dir", world, "--data.shapes_train_images", str(args.train_images)]

    sft = args.sft or train("conf/sft.yaml", os.path.join(out, "sft"),
                            data + ["--trainer.max_steps", str(args.sft_steps),
                                    "--trainer.val_check_interval", str(args.sft_steps)], fresh=args.fresh)

    import seva_pairs

    seva_dir = os.path.join(out, "seva")
    summary = seva_pairs.main(["--model", sft, "--prompts", os.path.join(world, "prompts", "train-*.tar"),
                               "--out", os.path.join(seva_dir, "seva-%06d.tar"), "--augment", args.augment,
                               "--t", str(args.t), "--limit", str(args.seva_prompts), "--max-new-tokens", "48",
                               "--batch-size", str(args.batch_size), "--shard-size", "100", "--no-progress"])
    log(f"SeVa pairs: {json.dumps(summary)}")
    # this run's shards only: a rerun that made fewer pairs must not read an earlier run's extra shard
    train_set, val, swapped, n_train = split_pairs(summary["shards"], os.path.join(out, "pairs"))
    log(f"{n_train} training pairs, the rest held out for DPO's validation")
    sets = {"dpo": train_set}
    if args.control:
        sets["dpo_swapped"] = swapped
    runs = {}
    for name, tr in sets.items():
        runs[name] = train("conf/dpo.yaml", os.path.join(out, name), [
            "--model.init_args.backbone.checkpoint", os.path.join(sft, "merged"), "--model.init_args.beta", str(args.beta),
            "--data.train", tr, "--data.val", val, "--trainer.max_steps", str(args.dpo_steps),
            "--trainer.val_check_interval", str(args.dpo_steps), "--trainer.limit_val_batches", "20"],
            inputs=[tr, val, os.path.join(sft, "merged")], fresh=args.fresh)

    work = os.path.join(out, "eval")
    os.makedirs(work, exist_ok=True)
    report = evaluate({"sft": sft, **runs}, world, work, args.batch_size)
    report["seva"] = summary
    report["seconds"] = time.time() - start
    text = table(report)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    log(f"done in {report['seconds'] / 60:.1f} min; report in {os.path.join(out, 'report.md')}")
    return report


if __name__ == "__main__":
    main()
