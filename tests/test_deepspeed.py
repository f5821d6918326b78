"""DeepSpeed ZeRO-2 and ZeRO-3 through Lightning on CPU processes (the test-only strategy in deepspeed_cpu.py).

Each run starts from an exported checkpoint with LoRA (B = 0, so the first loss is the base model's) and must
give the same first-step loss as the plain strategy: under ZeRO-3 that proves the checkpoint was loaded into the
partitioned parameters. Runs go in subprocesses: DeepSpeed initialises a process group per run.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {here!r})
import lightning as L
import torch
from deepspeed_cpu import CPUDeepSpeedStrategy
from vlalign.backbone import BackboneConfig
from vlalign.data.module import ShardDataModule
from vlalign.optim import OptimConfig
from vlalign.sft import SFTModule

stage, ckpt, shards = int(sys.argv[1]), sys.argv[2], sys.argv[3]
losses = []

class Grab(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        losses.append(float(outputs["loss"]))

L.seed_everything(0)
module = SFTModule(BackboneConfig(checkpoint=ckpt, lora={{"r": 4, "alpha": 8}}, train_projector=False), OptimConfig(lr=1e-3))
dm = ShardDataModule(train=shards, val=None, batch_size=4, num_workers=0, shuffle_buffer=0)
strategy = "auto" if stage == 0 else CPUDeepSpeedStrategy(stage=stage)
trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, strategy=strategy, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Grab()])
trainer.fit(module, dm)
print("RESULT " + json.dumps(losses))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, make_backbone):
    out = tmp_path_factory.mktemp("ds") / "tiny"
    make_backbone().export_merged(str(out))
    return str(out)


def _run(stage, ckpt, shards, tmp_path):
    script = tmp_path / f"run{stage}.py"
    script.write_text(SCRIPT.format(here=HERE))
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + stage),
               HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(script), str(stage), ckpt, shards], capture_output=True, text=True,
                         env=env, timeout=600, cwd=str(tmp_path))
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    return json.loads(lines[-1][7:])


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_match_plain_first_step(stage, exported, shapes_dir, tmp_path):
    shards = f"{shapes_dir}/sft/train-*.tar"
    plain = _run(0, exported, shards, tmp_path)
    zero = _run(stage, exported, shards, tmp_path)
    assert len(zero) == 3 and all(l == l for l in zero)  # finite
    assert abs(zero[0] - plain[0]) < 1e-4, (zero, plain)
