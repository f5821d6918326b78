"""The README's training commands through the real CLI, shortened: SFT from scratch, then DPO (with a weighted
mix of losses given on the command line), KTO, the reward model and PPO from its export (PPO scoring with that reward
model)."""

import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fit(config, tmp, *overrides):
    cmd = [sys.executable, "src/train.py", "fit", "--config", config, "--trainer.enable_progress_bar", "false",
           "--data.shapes_dir", str(tmp / "shapes"), "--data.shapes_train_images", "300", "--data.num_workers", "1",
           *overrides]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


def _scalars(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir)
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def test_sft_then_dpo_kto_reward_and_ppo_through_the_cli(tmp_path):
    runs = tmp_path / "runs"
    _fit("conf/sft.yaml", tmp_path, "--trainer.max_steps", "40", "--trainer.val_check_interval", "20",
         "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "5",
         "--trainer.default_root_dir", str(runs / "sft"), "--trainer.logger.init_args.save_dir", str(runs),
         "--model.init_args.export_dir", str(runs / "sft" / "export"))
    logdir = str(runs / "sft")  # the stable run directory (logger version "")
    assert glob.glob(os.path.join(logdir, "events.out.tfevents*"))
    assert os.path.exists(os.path.join(logdir, "config.yaml")) and os.path.exists(os.path.join(logdir, "hparams.yaml"))
    losses = _scalars(logdir, "train/loss")
    assert losses[-1] < losses[0] - 1.0, losses
    assert glob.glob(os.path.join(logdir, "checkpoints", "*.ckpt"))
    assert os.path.exists(runs / "sft" / "export" / "merged" / "model.safetensors")
    assert _scalars(logdir, "perf/tokens_per_sec")

    _fit("conf/dpo.yaml", tmp_path, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
               "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
               "--trainer.default_root_dir", str(runs / "dpo"), "--trainer.logger.init_args.save_dir", str(runs),
               "--model.init_args.backbone.checkpoint", str(runs / "sft" / "export" / "merged"),
               "--model.init_args.loss", "{sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}",
               "--model.init_args.export_dir", str(runs / "dpo" / "export"))
    logdir = str(runs / "dpo")  # the stable run directory (logger version "")
    for tag in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "tokens_seen"):
        assert _scalars(logdir, f"train/{tag}"), tag
    assert _scalars(logdir, "val/rewards/accuracies") and _scalars(logdir, "val/loss")
    assert os.path.exists(runs / "dpo" / "export" / "adapter" / "adapter_model.safetensors")

    _fit("conf/kto.yaml", tmp_path, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
         "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
         "--trainer.default_root_dir", str(runs / "kto"), "--trainer.logger.init_args.save_dir", str(runs),
         "--model.init_args.backbone.checkpoint", str(runs / "sft" / "export" / "merged"),
         "--model.init_args.export_dir", str(runs / "kto" / "export"))
    logdir = str(runs / "kto")  # the stable run directory (logger version "")
    for tag in ("train/loss", "train/kl", "train/rewards/desirable", "val/loss", "val/rewards/undesirable"):
        assert _scalars(logdir, tag), tag
    assert os.path.exists(runs / "kto" / "export" / "merged" / "model.safetensors")

    _fit("conf/reward.yaml", tmp_path, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
         "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "1",
         "--trainer.default_root_dir", str(runs / "reward"), "--trainer.logger.init_args.save_dir", str(runs),
         "--model.init_args.backbone.checkpoint", str(runs / "sft" / "export" / "merged"),
         "--model.init_args.export_dir", str(runs / "reward" / "export"))
    logdir = str(runs / "reward")  # the stable run directory (logger version "")
    for tag in ("train/loss", "train/accuracy", "val/accuracy", "val/margin", "val/reward_mean", "val/reward_std"):
        assert _scalars(logdir, tag), tag
    assert os.path.exists(runs / "reward" / "export" / "value_head.safetensors")

    _fit("conf/ppo.yaml", tmp_path, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
         "--trainer.limit_val_batches", "1", "--model.init_args.sampling.max_new_tokens", "8",
         "--trainer.default_root_dir", str(runs / "ppo"), "--trainer.logger.init_args.save_dir", str(runs),
         "--model.init_args.backbone.checkpoint", str(runs / "sft" / "export" / "merged"),
         "--model.init_args.reward_model", str(runs / "reward" / "export"),
         "--model.init_args.export_dir", str(runs / "ppo" / "export"))
    logdir = str(runs / "ppo")  # the stable run directory (logger version "")
    for tag in ("train/reward_mean", "train/kl", "train/policy_loss", "train/value_loss", "val/reward_mean", "val/kl"):
        assert _scalars(logdir, tag), tag
    assert os.path.exists(runs / "ppo" / "export" / "merged" / "model.safetensors")


def test_missing_checkpoint_gives_a_clear_error(tmp_path):
    cmd = [sys.executable, "src/train.py", "fit", "--config", "conf/dpo.yaml",
           "--model.init_args.backbone.checkpoint", str(tmp_path / "nope")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "is not a local directory" in res.stderr
