"""DeepSpeed ZeRO-2 and ZeRO-3 through Lightning on CPU processes (the test-only strategy in deepspeed_cpu.py).

Each run starts from exported checkpoints and must reproduce the plain strategy's first figure:

* SFT with LoRA (B = 0, so the first loss is the base model's): under ZeRO-3 that proves the checkpoint was
  loaded into the partitioned parameters;
* the reward model's first loss: its value head, created inside ``deepspeed.zero.Init``, got the same
  initialisation;
* PPO's first rollout: the reward model (backbone and head) loaded into partitions scores the same responses,
  and the critic head starts equal to the reward model's head.

Runs go in subprocesses: DeepSpeed initialises a process group per run.
"""

import json
import os
import socket
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
from vlalign.backbone import BackboneConfig, LoraSpec
from vlalign.zero import gathered
from vlalign.data.module import ShardDataModule
from vlalign.optim import OptimConfig

kind, stage, ckpt, shards, reward = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
out = {{"losses": []}}

class Grab(L.Callback):
    def on_fit_start(self, trainer, module):
        if kind == "ppo":
            with gathered([module.critic_head.weight, module.reward.head.weight], modify=False):
                out["critic_head_diff"] = float((module.critic_head.weight - module.reward.head.weight).abs().max())
            out["critic_head_shape"] = list(module.critic_head.weight.shape)

    def on_train_batch_start(self, trainer, module, batch, idx):
        if idx == 0:
            torch.manual_seed(0)  # the same sampled rollout whatever the strategy consumed from the RNG before

    def on_train_batch_end(self, trainer, module, outputs, batch, idx):
        if kind == "ppo":
            out["losses"].append(float(trainer.callback_metrics["train/reward_mean"]))
        else:
            out["losses"].append(float(outputs["loss"]))

L.seed_everything(0)
lora = LoraSpec(r=4, alpha=8, dropout=0.0)
if kind == "sft":
    from vlalign.sft import SFTModule
    module = SFTModule(BackboneConfig(checkpoint=ckpt, lora=lora, train_projector=False), OptimConfig(lr=1e-3))
elif kind == "reward":
    from vlalign.reward import RewardModule
    module = RewardModule(BackboneConfig(checkpoint=ckpt, train_projector=False, train_language=False),
                          OptimConfig(lr=1e-3))  # the head alone trains: its initialisation decides the first loss
elif kind == "ppo":
    from vlalign.ppo import PPOModule
    from vlalign.generation import Sampling
    from vlalign.ppo import PPOConfig
    module = PPOModule(BackboneConfig(checkpoint=ckpt, lora=lora, train_projector=False), reward,
                       OptimConfig(lr=1e-3), PPOConfig(epochs=1), Sampling(max_new_tokens=6, do_sample=True),
                       sample_every=0, critic_lora=lora)
dm = ShardDataModule(train=shards, val=None, batch_size=4, num_workers=0, shuffle_buffer=0)
strategy = "auto" if stage == 0 else CPUDeepSpeedStrategy(stage=stage)
trainer = L.Trainer(max_steps=2 if kind == "ppo" else 3, accelerator="cpu", devices=1, strategy=strategy,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[Grab()])
trainer.fit(module, dm)
print("RESULT " + json.dumps(out))
"""

SHARDS = {"sft": "sft/train-*.tar", "reward": "preference/train-*.tar", "ppo": "prompts/train-*.tar"}


_PLAIN: dict = {}


def _free_port() -> int:
    """A port nobody listens on now (two test runs on one machine must not share MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(kind, stage, exported, shapes_dir, tmp_path):
    if stage == 0 and kind in _PLAIN:
        return _PLAIN[kind]
    base, reward = exported
    script = tmp_path / f"run_{kind}{stage}.py"
    script.write_text(SCRIPT.format(here=HERE))
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(script), kind, str(stage), base, f"{shapes_dir}/{SHARDS[kind]}", reward],
                         capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stderr[-4000:]
    out = json.loads(lines[-1][7:])
    if stage == 0:
        _PLAIN[kind] = out
    return out


@pytest.mark.parametrize("kind,stage", [("sft", 2), ("sft", 3), ("reward", 3), ("ppo", 3)])
def test_zero_stages_match_plain_first_step(kind, stage, reward_export, shapes_dir, tmp_path):
    plain = _run(kind, 0, reward_export, shapes_dir, tmp_path)
    zero = _run(kind, stage, reward_export, shapes_dir, tmp_path)
    steps = 2 if kind == "ppo" else 3
    assert len(zero["losses"]) == steps and all(l == l for l in zero["losses"])  # finite
    assert abs(zero["losses"][0] - plain["losses"][0]) < 1e-4, (zero, plain)
    if kind == "ppo":
        assert zero["critic_head_diff"] == 0.0 and plain["critic_head_diff"] == 0.0
