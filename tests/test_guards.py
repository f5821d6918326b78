"""The non-finite guard and start-up validation, on the tiny model under the real Trainer and the real CLI.

* One NaN in a batch's stored reference log-probs: with ``optim.nonfinite: skip`` that optimizer step is skipped
  (every trainable weight bit-identical across it), counted (``skipped_steps``, also in the checkpoint) and logged
  with the batch's sample ids, and training goes on; with ``raise`` the error names those ids.
* An absurd learning rate (1e30): the steps that turn non-finite are skipped or stop the run, and no checkpoint of
  NaN weights is ever written.
* Config mistakes fail when the CLI instantiates the module, before any model is built, naming the YAML key.
"""

import glob
import json
import logging
import os
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from vlalign.backbone import BackboneConfig, LoraSpec
from vlalign.data.module import ShardDataModule
from vlalign.dpo import DPOModule
from vlalign.optim import OptimConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def base(tmp_path_factory, make_backbone):
    """A tiny LLaVA exported as a checkpoint directory (the SFT model a preference run starts from)."""
    out = tmp_path_factory.mktemp("guards") / "base"
    make_backbone().export_merged(str(out))
    return str(out)


def _module(base, nonfinite="skip", lr=1e-2, reference="precomputed"):
    cfg = BackboneConfig(checkpoint=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), train_projector=False)
    return DPOModule(cfg, OptimConfig(lr=lr, schedule="constant", nonfinite=nonfinite), reference=reference)


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


class StoredRefLogps(L.Callback):
    """Gives every batch stored reference log-probs (as ``reference: precomputed`` reads them from the shards), with
    one NaN in batch ``nan_at``; snapshots the trainable weights around that batch's step."""

    def __init__(self, nan_at=None):
        self.nan_at, self.ids, self.before, self.after = nan_at, None, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        n = len(batch["ids"])
        batch["ref_logps_sum"] = torch.full((n, 2), -20.0)
        batch["ref_logps_mean"] = torch.full((n, 2), -1.0)
        if batch_idx == self.nan_at:
            batch["ref_logps_sum"][n - 1, 1] = float("nan")
            self.ids, self.before = list(batch["ids"]), _trainable(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.nan_at:
            self.after = _trainable(module)


def _fit(module, shapes_dir, steps, callbacks=(), **trainer_kw):
    dm = ShardDataModule(train=f"{shapes_dir}/preference/train-*.tar", val=None, batch_size=4, num_workers=0,
                         shuffle_buffer=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks),
                        **{"enable_checkpointing": False, **trainer_kw})
    trainer.fit(module, dm)
    return trainer


def _finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_nan_in_stored_ref_logps_is_skipped_counted_and_training_goes_on(base, shapes_dir, tmp_path, caplog):
    m = _module(base, "skip")
    cb = StoredRefLogps(nan_at=1)
    with caplog.at_level(logging.WARNING, logger="vlalign.module"):
        trainer = _fit(m, shapes_dir, 4, [cb])
    assert m.skipped_steps == 1
    for name, before in cb.before.items():
        assert torch.equal(cb.after[name], before), f"{name} changed in the skipped step"
    after = _trainable(m)
    assert _finite(after.values())
    assert any(not torch.equal(after[n], cb.after[n]) for n in after), "no training after the skipped step"
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "non-finite loss" in warning and str(cb.ids) in warning
    assert trainer.callback_metrics["train/skipped_steps"].item() == 1.0
    ckpt = tmp_path / "after.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["skipped_steps"] == 1


def test_nan_in_stored_ref_logps_with_raise_names_the_sample_ids(base, shapes_dir):
    m = _module(base, "raise")
    cb = StoredRefLogps(nan_at=1)
    with pytest.raises(RuntimeError, match="non-finite loss") as err:
        _fit(m, shapes_dir, 4, [cb])
    assert str(cb.ids) in str(err.value) and "global step 1" in str(err.value)
    assert "gradients of" in str(err.value)  # backward of a NaN loss: the gradients are named too


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_absurd_learning_rate_never_saves_nan_weights(base, shapes_dir, tmp_path, policy):
    from lightning.pytorch.callbacks import ModelCheckpoint

    m = _module(base, policy, lr=1e30)
    ckpts = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="s{step}")
    if policy == "skip":
        _fit(m, shapes_dir, 4, [StoredRefLogps(), ckpts], enable_checkpointing=True)
        assert m.skipped_steps >= 1
        assert _finite(_trainable(m).values())
    else:
        with pytest.raises(RuntimeError, match="non-finite"):
            _fit(m, shapes_dir, 4, [StoredRefLogps(), ckpts], enable_checkpointing=True)
    saved = glob.glob(str(tmp_path / "*.ckpt"))
    assert saved
    for path in saved:
        assert _finite(torch.load(path, weights_only=False)["state_dict"].values()), path


def test_nan_weights_are_never_checkpointed(base):
    m = _module(base)
    m.configure_model()
    name, p = next((n, p) for n, p in m.named_parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[0] = float("inf")
    with pytest.raises(RuntimeError, match="refusing to checkpoint.*NaN or inf"):
        m.on_save_checkpoint({"state_dict": m.state_dict()})


# ---------------------------------------------------------------------------------------------- start-up validation
def _config_dir(tmp_path, model_type):
    d = tmp_path / model_type
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(d)


CASES = [  # (config, overrides, message)
    ("dpo", ["--model.init_args.beta", "0"], "model.init_args.beta must be > 0, got 0"),
    ("dpo", ["--model.init_args.beta", "-0.1"], "model.init_args.beta must be > 0, got -0.1"),
    ("dpo", ["--model.init_args.optim.projector_lr=-1e-5"], "model.init_args.optim.projector_lr must be > 0"),
    ("dpo", ["--model.init_args.optim.lr", "-0.001"], "model.init_args.optim.lr must be > 0, got -0.001"),
    ("dpo", ["--model.init_args.optim.betas", "[0.9, 1.0]"], "model.init_args.optim.betas must be two numbers"),
    ("dpo", ["--model.init_args.optim.warmup_ratio", "1.5"], "model.init_args.optim.warmup_ratio must be in [0, 1]"),
    ("dpo", ["--model.init_args.optim.schedule", "cosin"], "model.init_args.optim.schedule must be cosine |"),
    ("dpo", ["--model.init_args.optim.nonfinite", "ignore"], "model.init_args.optim.nonfinite must be skip | raise"),
    ("dpo", ["--model.init_args.layout", "packd"], "model.init_args.layout must be packed | plain"),
    ("dpo", ["--model.init_args.reference", "frozen"], "model.init_args.reference must be adapter |"),
    ("dpo", ["--model.init_args.loss", "sigmod"], "model.init_args.loss / loss_params: unknown preference loss"),
    ("dpo", ["--model.init_args.backbone.lora.r", "-4"], "model.init_args.backbone.lora.r must be an integer >= 0"),
    ("dpo", ["--model.init_args.backbone.lora.dropout", "1.0"], "model.init_args.backbone.lora.dropout must be in"),
    ("dpo", ["--model.init_args.backbone.dtype", "fp16"], "model.init_args.backbone.dtype must be one of"),
    ("dpo", ["--model.init_args.backbone.checkpoint", "{gpt2}"],
     "model.init_args.backbone.checkpoint: not a LLaVA checkpoint: {gpt2} has model_type 'gpt2'"),
    ("dpo", ["--model.init_args.backbone.checkpoint", "{llama}"], "not a LLaVA checkpoint: {llama} has model_type"),
    ("dpo", ["--model.init_args.backbone.checkpoint", "{llava_llama}"], "original LLaVA repository layout"),
    ("dpo", ["--model.init_args.backbone.checkpoint", "{tmp}/missing"], "model.init_args.backbone.checkpoint: "),
    ("dpo", ["--model.init_args.reference", "copy", "--model.init_args.reference_backbone.checkpoint", "{gpt2}"],
     "model.init_args.reference_backbone.checkpoint: not a LLaVA checkpoint"),
    ("kto", ["--model.init_args.beta", "0"], "model.init_args.beta must be > 0, got 0"),
    ("kto", ["--model.init_args.desirable_weight", "-1"], "model.init_args.desirable_weight must be >= 0"),
    ("ppo", ["--model.init_args.ppo.kl_coef", "-0.1"], "model.init_args.ppo.kl_coef must be >= 0"),
    ("ppo", ["--model.init_args.optim.head_lr", "0"], "model.init_args.optim.head_lr must be > 0"),
    ("ppo", ["--model.init_args.reward_model", "{tmp}"], "model.init_args.reward_model: "),
    ("reward", ["--model.init_args.loss", "bt"], "model.init_args.loss must be bradley_terry | plackett_luce"),
    ("sft", ["--model.init_args.optim.weight_decay", "-0.01"], "model.init_args.optim.weight_decay must be >= 0"),
    ("sft", ["--data.batch_size", "0"], "data.batch_size must be an integer >= 1, got 0"),
    ("sft", ["--data.num_workers=-1"], "data.num_workers must be an integer >= 0, got -1"),
    ("sft", ["--data.padding_side", "middle"], "data.padding_side must be one of"),
    ("sft", ["--data.train", "{tmp}/none-*.tar"], "data.train: no shards match"),
]


@pytest.mark.parametrize("config,overrides,message", CASES, ids=[f"{c[0]} {' '.join(c[1][-2:])}" for c in CASES])
def test_config_mistakes_name_the_key(base, tmp_path, config, overrides, message):
    """Through the real CLI, in process: instantiation fails with the named key (nothing is built or trained)."""
    from vlalign.cli import main

    dirs = {t: _config_dir(tmp_path, t) for t in ("gpt2", "llama", "llava_llama")}
    subst = {"tmp": str(tmp_path), **dirs}
    overrides = [o.format(**subst) for o in overrides]
    args = ["fit", "--config", os.path.join(ROOT, "conf", f"{config}.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.default_root_dir",
            str(tmp_path / "runs"), "--data.shapes_dir", str(tmp_path / "shapes")]
    if config != "sft":
        args += ["--model.init_args.backbone.checkpoint", base]
    with pytest.raises(Exception) as err:
        main(args + overrides)
    assert message.format(**subst) in str(err.value), str(err.value)[:1500]
    assert not os.path.exists(tmp_path / "shapes"), "the data was built before the config was checked"


def test_cli_refuses_beta_zero_before_building_anything(base, tmp_path):
    """The command as a user types it: a non-zero exit, the named key, and no model built (nor any run folder)."""
    cmd = [sys.executable, "src/train.py", "fit", "--config", "conf/dpo.yaml", "--model.init_args.beta", "0",
           "--model.init_args.backbone.checkpoint", base, "--trainer.fast_dev_run", "true",
           "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--data.shapes_dir", str(tmp_path / "d")]
    start = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    print(f"failed after {time.time() - start:.1f} s")
    assert res.returncode != 0
    assert "model.init_args.beta must be > 0, got 0" in res.stderr
    assert "configure_model" not in res.stderr and not os.path.exists(tmp_path / "runs")


def test_ppo_steps_with_a_nan_reward_are_skipped(reward_export, shapes_dir, tmp_path):
    """PPO optimises manually: its own guard call skips every minibatch step of a rollout scored NaN (a reward
    model whose value head holds a NaN), and leaves the policy and the critic untouched."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vlalign.generation import Sampling
    from vlalign.ppo import PPOConfig, PPOModule

    base, reward = reward_export
    broken = tmp_path / "reward"
    shutil.copytree(reward, broken)
    head = load_file(str(broken / "value_head.safetensors"))
    head["weight"][0, 0] = float("nan")
    save_file(head, str(broken / "value_head.safetensors"))
    cfg = BackboneConfig(checkpoint=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), train_projector=False)
    m = PPOModule(cfg, str(broken), OptimConfig(lr=1e-2, schedule="constant"),
                  PPOConfig(epochs=1, minibatch_size=2, reward_scale=1.0), Sampling(max_new_tokens=4),
                  sample_every=0)
    m.configure_model()
    before = _trainable(m)
    dm = ShardDataModule(train=f"{shapes_dir}/prompts/train-*.tar", val=None, batch_size=4, num_workers=0,
                         shuffle_buffer=0)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(m, dm)
    assert m.skipped_steps == 2
    for name, p in _trainable(m).items():  # (the critic's head starts as the broken one: NaN == NaN here)
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True, msg=name)
