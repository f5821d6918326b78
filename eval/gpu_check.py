"""The GPU check: one script that exercises the project on one CUDA GPU and writes a results table.

    python eval/gpu_check.py --out runs/gpu_check                  # on a GPU machine (about 8 minutes on one H200)
    python eval/gpu_check.py --out /tmp/gpu_check --cpu            # the same steps on the CPU, small, as a dry run

What it runs, in this order (``--only`` picks a subset: ``tests``, ``tiny``, ``big``):

1. ``tests``: ``pytest -m gpu tests/test_gpu.py`` (bf16 packed vs plain log-probs, SDPA and eager attention, the
   KV cache, SeVa / SIMA pair generation, PPO rollouts, ``bf16-mixed`` / ``bf16-true``); their figures are kept.
2. ``tiny``: the shipped configs through the real CLI (``src/train.py fit --config conf/X.yaml``) on the embedded
   tiny model, under DeepSpeed ZeRO-2 and ZeRO-3 (one process each; the two stages run side by side): SFT, then DPO
   and the reward model from the SFT export, then PPO from both. Each config trains, checkpoints, is resumed from
   its checkpoint by a second command, and exports; every export is then loaded with plain ``transformers``
   (``LlavaForConditionalGeneration`` + ``AutoProcessor``) and generates.
3. ``big``: a LLaVA-1.5-7B-shaped model with random weights (CLIP ViT-L/14 at 336 px = 576 image tokens, Llama-7B,
   vocabulary 32064) saved as a bf16 safetensors checkpoint, then DPO (LoRA r 128 / alpha 256 on every language
   linear, batch 4, synthetic pairs with ~40-token prompts and 150-250-token answers) through the CLI under ZeRO-3,
   packed and plain layouts: the Benchmark callback's pairs/s, tokens/s, step time, MFU and peak memory, plus the
   peak host memory while the checkpoint loads into ZeRO-3 partitions (it must stay well below the model's size:
   the model is never materialised whole on the host). The packed run checkpoints; a second command resumes it and
   exports, and the export loads with plain ``transformers`` and generates.

Results: ``OUT/results.md`` (the table) and ``OUT/results.json``; each command's log under ``OUT/logs``.
With ``--cpu`` every step runs on the CPU at small sizes, ZeRO through the test-only CPU DeepSpeed strategy
(``tests/deepspeed_cpu.py``), so the script can be checked without spending GPU time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import lightning as L
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from dpo_speed import big_shapes, make_big_checkpoint, write_long_pairs  # noqa: E402  (the 7B-shaped model, one copy)


# ---------------------------------------------------------------------------------------------- in-run probe
class Probe(L.Callback):
    """Appends one JSON line per ``fit`` to ``path``: start / end step, losses, peak host and GPU memory at the end of
    model set-up (``on_fit_start``: the model is built, loaded and wrapped by DeepSpeed) and at the end."""

    def __init__(self, path: str):
        self.path, self.losses, self.setup = path, [], {}

    @staticmethod
    def _memory() -> dict:
        out = {"host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if torch.cuda.is_available():
            out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out

    def on_fit_start(self, trainer, pl_module):
        self.setup = {k + "_after_setup": v for k, v in self._memory().items()}
        self.t0 = time.perf_counter()

    def on_train_start(self, trainer, pl_module):  # after a checkpoint's loops were restored
        self.setup["start_step"] = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.losses.append(float(loss))

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        rec = {**self.setup, "end_step": trainer.global_step, "losses": self.losses,
               "fit_seconds": time.perf_counter() - self.t0, **self._memory()}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


# ------------------------------------------------------------------------------------------------- commands
class Runner:
    def __init__(self, out: str, cpu: bool):
        self.out, self.cpu = out, cpu
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        paths = [os.path.join(ROOT, "src"), os.path.join(ROOT, "eval"), os.path.join(ROOT, "tests"),
                 self.env.get("PYTHONPATH", "")]
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)

    def run(self, name: str, cmd: list[str], cwd: str, timeout: int = 600) -> dict:
        t0 = time.perf_counter()
        with open(os.path.join(self.logs, name + ".log"), "w") as log:
            log.write(" ".join(cmd) + "\n\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        dt = time.perf_counter() - t0
        print(f"[{time.strftime('%H:%M:%S')}] {name}: rc={rc} {dt:.1f}s", flush=True)
        return {"name": name, "rc": rc, "seconds": round(dt, 1)}

    def tail(self, name: str, n: int = 30) -> str:
        with open(os.path.join(self.logs, name + ".log")) as f:
            return "".join(f.readlines()[-n:])


def strategy_args(stage: int, cpu: bool) -> list[str]:
    if cpu:
        return ["--trainer.strategy.class_path", "deepspeed_cpu.CPUDeepSpeedStrategy",
                "--trainer.strategy.init_args.stage", str(stage), "--trainer.accelerator", "cpu",
                "--trainer.precision", "32-true"]
    return ["--trainer.strategy", f"deepspeed_stage_{stage}", "--trainer.accelerator", "gpu",
            "--trainer.precision", "bf16-mixed", "--torch_threads", "null"]


def newest_checkpoint(workdir: str, name: str) -> str:
    found = glob.glob(os.path.join(workdir, "runs", name, "**", "last*.ckpt"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no last.ckpt under {workdir}/runs/{name}")
    return max(found, key=os.path.getmtime)


def read_probe(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------- tiny CLI chains
TINY = {  # config -> (steps of the first command, steps after resuming), validation at the first command's end
    "sft": (12, 20),
    "dpo": (6, 10),
    "reward": (6, 10),
    "ppo": (2, 4),
}


def tiny_chain(r: Runner, stage: int, shapes: str) -> list[dict]:
    """SFT -> (DPO, reward) -> PPO under one ZeRO stage, in its own working directory; returns one row per config."""
    work = os.path.join(r.out, f"tiny_zero{stage}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    rows = []
    for cfg, (first, second) in TINY.items():
        probe = os.path.join(work, f"probe_{cfg}.jsonl")
        common = [sys.executable, os.path.join(ROOT, "src", "train.py"), "fit",
                  "--config", os.path.join(ROOT, "conf", f"{cfg}.yaml"), *strategy_args(stage, r.cpu),
                  "--data.shapes_dir", shapes, "--data.num_workers", "1", "--trainer.limit_val_batches", "2",
                  "--trainer.val_check_interval", str(first), "--trainer.log_every_n_steps", "1",
                  "--trainer.enable_progress_bar", "false", f"--trainer.callbacks+=gpu_check.Probe",
                  "--trainer.callbacks.path", probe]
        if cfg == "reward":
            common += ["--model.init_args.export_dir", "runs/reward/export"]
        a = r.run(f"zero{stage}_{cfg}_train", common + ["--trainer.max_steps", str(first)], work)
        row = {"config": cfg, "stage": stage, "train_rc": a["rc"], "train_s": a["seconds"]}
        try:
            ckpt = newest_checkpoint(work, cfg)
            b = r.run(f"zero{stage}_{cfg}_resume", common + ["--trainer.max_steps", str(second), "--ckpt_path", ckpt],
                      work)
            row.update(resume_rc=b["rc"], resume_s=b["seconds"])
        except FileNotFoundError as e:
            row.update(resume_rc=str(e))
        probes = read_probe(probe)
        if len(probes) == 2:
            row.update(trained_to=probes[0]["end_step"], resumed_at=probes[1]["start_step"],
                       ended_at=probes[1]["end_step"], first_loss=(probes[0]["losses"] or [None])[0],
                       last_loss=(probes[1]["losses"] or [None])[-1])
        export = os.path.join(work, "runs", cfg, "export", "merged")
        row["exported"] = os.path.isfile(os.path.join(export, "config.json"))
        rows.append(row)
    exports = [os.path.join(work, "runs", cfg, "export", "merged") for cfg in TINY]
    g = r.run(f"zero{stage}_generate", [sys.executable, os.path.abspath(__file__), "--generate", *exports,
                                        *(["--cpu"] if r.cpu else [])], work)
    for row in rows:
        row["transformers_generate"] = g["rc"] == 0
    return rows


def generate_with_transformers(paths: list[str], device: str) -> None:
    """Load each export with plain transformers (no project code) and generate a few tokens from one image."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    for path in paths:
        t0 = time.perf_counter()
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype="auto").to(device).eval()
        processor = AutoProcessor.from_pretrained(path)
        size = processor.image_processor.crop_size["height"] if getattr(processor.image_processor, "crop_size",
                                                                        None) else 336
        image = Image.new("RGB", (size, size), (200, 40, 40))
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                               {"type": "text", "text": "What is in the image?"}]}],
                                             add_generation_prompt=True)
        inputs = processor(images=image, text=text, return_tensors="pt").to(device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        print(f"{path}: {model.dtype} {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, generated "
              f"{new.numel()} tokens in {time.perf_counter() - t0:.1f}s: {processor.decode(new)!r}", flush=True)
        assert new.numel() > 0
        del model


# --------------------------------------------------------------------------------------------- the big model
def parse_benchmark(log: str) -> dict:
    out = {}
    for line in log.splitlines():
        if line.startswith("benchmark: "):
            for item in line[len("benchmark: "):].split(", "):
                k, v = item.split("=")
                out[k] = float(v)
    return out


def big_runs(r: Runner, shapes: str) -> list[dict]:
    work = os.path.join(r.out, "big")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    ckpt = os.path.join(work, "llava-7b-shaped")
    rows = []
    info = {}
    t0 = time.perf_counter()
    g = r.run("big_make", [sys.executable, os.path.abspath(__file__), "--make-big", ckpt,
                           *(["--cpu"] if r.cpu else [])], work)
    if g["rc"] != 0:
        return [{"config": "big checkpoint", "rc": g["rc"], "log": r.tail("big_make")}]
    with open(os.path.join(ckpt, "gpu_check_info.json")) as f:
        info = json.load(f)
    steps = 4 if r.cpu else 10
    base = [sys.executable, os.path.join(ROOT, "src", "train.py"), "fit", "--config", os.path.join(ROOT, "conf", "dpo.yaml"),
            *strategy_args(3, r.cpu), "--trainer.precision", "32-true" if r.cpu else "bf16-true",
            "--model.init_args.backbone.checkpoint", ckpt, "--model.init_args.backbone.dtype",
            "float32" if r.cpu else "bfloat16", "--model.init_args.backbone.lora.r", "128",
            "--model.init_args.backbone.lora.alpha", "256", "--model.init_args.backbone.lora.dropout", "0.0",
            "--model.init_args.backbone.train_projector", "false", "--model.init_args.optim.warmup_steps", "0",
            "--data.train", os.path.join(work, "pairs", "train-*.tar"), "--data.val", "null",
            "--data.batch_size", "4", "--data.max_length", "1200", "--data.num_workers", "2",
            "--data.shuffle_buffer", "0", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false"]
    for layout in ("packed", "plain"):
        probe = os.path.join(work, f"probe_{layout}.jsonl")
        name = f"big_dpo_{layout}"

        callbacks = [{"class_path": "vlalign.callbacks.Benchmark", "init_args": {"log_every": 1, "warmup_steps": 3}},
                     {"class_path": "gpu_check.Probe", "init_args": {"path": probe}}]
        if layout == "packed":  # the packed run checkpoints at its end and is resumed; the plain one only measures
            callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                              "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": steps}})

        def command(max_steps, export_dir="null", ckpt=None):
            return base + ["--trainer.callbacks", json.dumps(callbacks),
                           "--trainer.enable_checkpointing", str(layout == "packed").lower(),
                           "--model.init_args.layout", layout,
                           "--trainer.max_steps", str(max_steps), "--model.init_args.export_dir", export_dir,
                           "--trainer.default_root_dir", f"runs/{name}", "--trainer.logger.init_args.name", name,
                           *(["--ckpt_path", ckpt] if ckpt else [])]

        a = r.run(name, command(steps), work, timeout=400)
        bench = parse_benchmark(r.tail(name, 200))
        p = (read_probe(probe) or [{}])[0]
        rows.append({"config": f"DPO {layout}, 7B-shaped, ZeRO-3, batch 4", "rc": a["rc"], "seconds": a["seconds"],
                     **bench, "host_peak_gib_after_setup": p.get("host_peak_gib_after_setup"),
                     "gpu_peak_gib_after_setup": p.get("gpu_peak_gib_after_setup"),
                     "losses": p.get("losses"), "model_gib": info.get("bytes_gib")})
        if layout == "packed" and a["rc"] == 0:
            try:
                last = newest_checkpoint(work, name)
                b = r.run(name + "_resume", command(steps + 2, "runs/big_export", last), work, timeout=400)
                shutil.rmtree(os.path.join(work, "runs", name), ignore_errors=True)  # a 7B ZeRO checkpoint: disk
                probes = read_probe(probe)
                rows[-1].update(resume_rc=b["rc"], resume_s=b["seconds"],
                                resumed_at=probes[1]["start_step"] if len(probes) > 1 else None)
                gen = r.run("big_generate", [sys.executable, os.path.abspath(__file__), "--generate",
                                             os.path.join(work, "runs", "big_export", "merged"),
                                             *(["--cpu"] if r.cpu else [])], work)
                rows[-1]["transformers_generate"] = gen["rc"] == 0
            except FileNotFoundError as e:
                rows[-1]["resume_rc"] = str(e)
    print(f"big total {time.perf_counter() - t0:.0f}s", flush=True)
    return [{"config": "7B-shaped checkpoint", **info}] + rows


# ----------------------------------------------------------------------------------------------------- table
def table(results: dict) -> str:
    lines = [f"# GPU check ({results['device']}, torch {results['torch']}, {results['date']})", ""]
    if "tests" in results:
        t = results["tests"]
        lines += [f"## tests/test_gpu.py: rc {t['rc']}, {t['seconds']} s", ""]
        for rec in t.get("figures", []):
            lines.append("- " + ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}"
                                          for k, v in rec.items()))
        lines.append("")
    if "tiny" in results:
        lines += ["## Tiny model through the CLI (train, checkpoint, resume, export, load with transformers)", "",
                  "| config | ZeRO | trained to | resumed at | ended at | first / last loss | train s | resume s | "
                  "exported | transformers generates |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["tiny"]:
            fl = f"{row.get('first_loss') or float('nan'):.3f} / {row.get('last_loss') or float('nan'):.3f}"
            lines.append(f"| {row['config']} | {row['stage']} | {row.get('trained_to')} | {row.get('resumed_at')} | "
                         f"{row.get('ended_at')} | {fl} | {row.get('train_s')} | {row.get('resume_s')} | "
                         f"{row.get('exported')} | {row.get('transformers_generate')} |")
        lines.append("")
    if "big" in results:
        lines += ["## 7B-shaped DPO through the CLI (LoRA r128, bf16-true, ZeRO-3, one GPU)", "",
                  "| run | pairs/s | tokens/s | step s | TFLOP/s | MFU | peak GPU GiB | host GiB after load | "
                  "GPU GiB after load | model GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["big"]:
            if "samples_per_sec" not in row:
                lines.append(f"| {row['config']} | " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "config")
                             + " |")
                continue
            f = lambda k, d=2: "" if row.get(k) is None else f"{row[k]:.{d}f}"  # noqa: E731
            lines.append(f"| {row['config']} | {f('samples_per_sec')} | {f('tokens_per_sec', 0)} | {f('step_time')} | "
                         f"{f('tflops_per_sec', 1)} | {f('mfu', 3)} | {f('max_memory_gib', 1)} | "
                         f"{f('host_peak_gib_after_setup', 1)} | {f('gpu_peak_gib_after_setup', 1)} | "
                         f"{f('model_gib', 1)} |")
            if "resume_rc" in row:
                lines.append(f"| ↳ resumed at step {row.get('resumed_at')} (rc {row['resume_rc']}, {row.get('resume_s')}"
                             f" s), exported, transformers generates: {row.get('transformers_generate')} | | | | | | "
                             "| | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check", help="results, logs and working directories")
    p.add_argument("--cpu", action="store_true", help="dry run on the CPU at small sizes")
    p.add_argument("--only", default="tests,tiny,big", help="comma-separated subset of tests,tiny,big")
    p.add_argument("--shapes", default=None, help="an already built shapes world (default: build one under --out)")
    p.add_argument("--generate", nargs="+", help=argparse.SUPPRESS)  # internal: load exports with transformers
    p.add_argument("--make-big", help=argparse.SUPPRESS)  # internal: write the 7B-shaped checkpoint
    args = p.parse_args(argv)
    if args.generate:
        return generate_with_transformers(args.generate, "cpu" if args.cpu else "cuda")
    if args.make_big:
        info = make_big_checkpoint(args.make_big, args.cpu)
        from vlalign.backbone import Backbone, BackboneConfig

        bb = Backbone(BackboneConfig(checkpoint=args.make_big))
        info.update(write_long_pairs(os.path.join(os.path.dirname(args.make_big), "pairs", "train-%06d.tar"),
                                     64 if not args.cpu else 16, big_shapes(args.cpu)["image"], bb.tokenizer))
        with open(os.path.join(args.make_big, "gpu_check_info.json"), "w") as f:
            json.dump(info, f)
        return

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    r = Runner(out, args.cpu)
    only = set(args.only.split(","))
    results = {"device": "cpu" if args.cpu else torch.cuda.get_device_name(0), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    t0 = time.perf_counter()
    shapes = args.shapes or os.path.join(out, "shapes")
    if "tiny" in only and not os.path.isdir(os.path.join(shapes, "sft")):
        sys.path.insert(0, os.path.join(ROOT, "src"))
        from vlalign.data.shapes import ensure_shapes

        ensure_shapes(shapes, train_images=600)
    figures = os.path.join(out, "figures")
    shutil.rmtree(figures, ignore_errors=True)
    jobs = {}
    with ThreadPoolExecutor(max_workers=3) as pool:
        if "tests" in only:
            r.env["GPU_CHECK_OUT"] = figures
            if args.cpu:
                r.env["VLALIGN_GPU_TESTS_ON_CPU"] = "1"
            jobs["tests"] = pool.submit(r.run, "tests", [sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                                                         "-p", "no:cacheprovider", os.path.join(ROOT, "tests",
                                                                                                "test_gpu.py")], ROOT)
        if "tiny" in only:
            jobs["tiny"] = [pool.submit(tiny_chain, r, stage, shapes) for stage in (2, 3)]
        if "tests" in jobs:
            results["tests"] = jobs["tests"].result()
            path = os.path.join(figures, "gpu_tests.jsonl")
            results["tests"]["figures"] = read_probe(path)
            results["tests"]["summary"] = r.tail("tests", 3)
        if "tiny" in jobs:
            results["tiny"] = [row for job in jobs["tiny"] for row in job.result()]
    write_results(out, results, t0)  # what is done so far survives a timeout of the rest
    if "big" in only:  # alone on the GPU: its figures are timings
        results["big"] = big_runs(r, shapes)
    print(write_results(out, results, t0))


def write_results(out: str, results: dict, t0: float) -> str:
    results["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = table(results) + f"\nTotal: {results['seconds']} s\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    main()
