"""The DPO speed benchmark (``bench/dpo_speed.py --size tiny``) runs and reports every row; the Benchmark callback
times the wait for data and writes its JSON summary into the run directory."""

import json
import os
import subprocess
import sys
import time

import lightning as L
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import dpo_speed  # noqa: E402


def _trl_importable() -> bool:
    return dpo_speed.trl_missing() is None


def test_tiny_benchmark_prints_and_writes_every_row(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "dpo_speed.py"), "--size", "tiny",
                           "--batch", "2", "--pairs", "8", "--warmup", "1", "--steps", "1", "--threads", "1",
                           "--checkpointing", "off,on", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| impl | variant | batch | ckpt | pairs/s")
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "vlalign"]
    assert {(r["variant"], r["checkpointing"]) for r in ours} == {
        (v, c) for v in ("plain", "packed", "precomputed") for c in (False, True)}
    for r in ours:
        assert r["step_s"] > 0 and r["pairs_per_s"] == pytest.approx(2 / r["step_s"])
        assert r["image_tokens_per_pair"] == 36  # the tiny LLaVA: 48 px / patch 8
        assert r["text_tokens_per_s"] > 0 and r["tflops_per_s"] > 0 and r["mfu"] is None  # CPU: no peak given
    trl = [r for r in rows if r["impl"].startswith("trl")]
    assert len(table) == 1 + len(rows)  # the header, then a line per row
    if _trl_importable():
        assert {r["checkpointing"] for r in trl} == {False, True} and all(r["step_s"] > 0 for r in trl)
        assert all(r["x_trl"] > 0 for r in ours)
    else:
        assert not trl and "no TRL row:" in proc.stdout and all(r["x_trl"] is None for r in ours)


def test_out_of_memory_rows_render_and_ratios_pair_by_batch():
    rows = [{"impl": "vlalign", "variant": "packed", "batch": 4, "checkpointing": False, "step_s": 0.5, "flops": 1e12, "peak_gib": 3.0,
             "image_tokens_per_pair": 10, "text_tokens_per_pair": 20},
            {"impl": "vlalign", "variant": "packed", "batch": 8, "checkpointing": False, "status": "OOM"},
            {"impl": "trl", "variant": "", "batch": 4, "checkpointing": False, "step_s": 1.0, "flops": 2e12, "peak_gib": 5.0,
             "image_tokens_per_pair": 10, "text_tokens_per_pair": 20}]
    dpo_speed.finish(rows, peak_flops=4e12)
    assert rows[0]["pairs_per_s"] == 8 and rows[0]["x_trl"] == 2 and rows[0]["mfu"] == 0.5
    assert rows[2]["x_trl"] == 1 and rows[1]["x_trl"] is None
    assert "| vlalign | packed | 8 | off | OOM |" in dpo_speed.table(rows)


class SlowBatches:
    """Pre-collated batches, each handed out after ``delay`` seconds (a data loader that cannot keep up)."""

    def __init__(self, batches, delay):
        self.batches, self.delay = batches, delay

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            time.sleep(self.delay)
            yield b


def test_benchmark_counts_the_wait_for_data_and_writes_json(tmp_path, capsys):
    from gpu_check import parse_benchmark
    from lightning.pytorch.loggers import TensorBoardLogger

    from vlalign.backbone import BackboneConfig, LoraSpec
    from vlalign.callbacks import Benchmark
    from vlalign.dpo import DPOModule
    from vlalign.optim import OptimConfig

    module = DPOModule(BackboneConfig(lora=LoraSpec(r=4, alpha=8, dropout=0.0), train_projector=False),
                       OptimConfig(lr=1e-3, schedule="constant"))
    bb = module.backbone
    records = dpo_speed.long_pair_records(4, 48, bb.tokenizer, prompt_tokens=(4, 6), answer_tokens=(4, 8))
    examples = dpo_speed.encode_pairs(bb, records, max_length=512)
    delay = 0.15
    data = SlowBatches(dpo_speed.batches(examples, 2, bb.tokenizer.pad_token_id, "packed", 5), delay)
    bench = Benchmark(log_every=1, warmup_steps=1)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path), name="run"),
                        callbacks=[bench], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, train_dataloaders=data)
    with open(os.path.join(trainer.log_dir, "benchmark.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 4 and summary["algorithm"] == "DPOModule"
    # every timed step waited `delay` for its batch before it started: that wait is in the step time
    assert summary["step_time"] >= delay
    assert summary["data_wait"] * summary["step_time"] >= 0.8 * delay
    assert summary["tflops_per_sec"] > 0 and summary["samples_per_sec"] == pytest.approx(2 / summary["step_time"])
    printed = parse_benchmark(capsys.readouterr().out)
    assert printed["steps"] == 4 and printed["step_time"] == pytest.approx(summary["step_time"], rel=1e-3)
