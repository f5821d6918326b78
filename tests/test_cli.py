"""The README's training commands through the real CLI, shortened: SFT from scratch, then DPO (with a weighted
mix of losses given on the command line), KTO, the reward model and PPO from its export (PPO scoring with that reward
model); DataMonitor's skip counts through the CLI; eval/demo.py's training stages rerun into the same directory."""

import glob
import json
import os
import subprocess
import sys

from raw_tar import write_tar

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


def _sample_members(key, answer="A shape.", image=True, bad=None):
    import io
    import json

    from PIL import Image

    record = {"kind": "sft", "id": key, "conversation": [{"role": "user", "content": "<image>\nWhat is it?"},
                                                         {"role": "assistant", "content": answer}]}
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), "red").save(buf, format="PNG")
    members = [(f"{key}.json", b'{"kind": "sft", "id": ' if bad == "bad_json" else json.dumps(record).encode())]
    return members + ([(f"{key}.png", b"not an image" if bad == "bad_image" else buf.getvalue())] if image else [])


def test_data_monitor_logs_train_and_val_skips_per_reason(tmp_path):
    """conf/sft.yaml's DataMonitor: ``train/skipped``, ``train/skipped/<reason>`` (since the run began) and
    ``val/skipped``, ``val/skipped/<reason>`` (per validation pass) equal the bad samples in the shards, and the
    end of fit prints both."""
    members = [m for i in range(8) for m in _sample_members(f"g{i}")]
    members += _sample_members("b0", bad="bad_image") + _sample_members("b1", bad="bad_json")
    train = write_tar(tmp_path / "train.tar", members + _sample_members("cut"), cut_inside="cut.png")
    val = write_tar(tmp_path / "val.tar", [m for i in range(3) for m in _sample_members(f"v{i}")]
               + _sample_members("b2", bad="bad_image") + _sample_members("b3")[1:])  # b3: an image, no .json
    runs = tmp_path / "runs"
    res = _fit("conf/sft.yaml", tmp_path, "--data.train", train, "--data.val", val, "--data.num_workers", "0",
               "--data.batch_size", "2", "--data.val_batch_size", "4", "--trainer.max_steps", "4",
               "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
               "--trainer.default_root_dir", str(runs / "sft"), "--trainer.logger.init_args.save_dir", str(runs),
               "--model.init_args.export_dir", str(runs / "sft" / "export"))
    logdir = str(runs / "sft")
    train_skips = {"bad_image": 1, "bad_json": 1, "shard_truncated": 1}
    assert _scalars(logdir, "train/skipped")[-1] == 3
    assert {r: _scalars(logdir, f"train/skipped/{r}")[-1] for r in train_skips} == train_skips
    assert _scalars(logdir, "val/skipped") == [2, 2]  # two validation passes, each counted on its own
    assert _scalars(logdir, "val/skipped/bad_image") == [1, 1] and _scalars(logdir, "val/skipped/no_json") == [1, 1]
    assert ("data: skipped 3 training samples (bad_image 1, bad_json 1, shard_truncated 1); 2 in the latest "
            "validation pass (bad_image 1, no_json 1)") in res.stdout


def test_demo_stage_rerun_resumes_and_changed_settings_restart(tmp_path):
    """eval/demo.py's training stages: a rerun into the same run directory is not refused but resumes (a finished
    stage only re-exports, to the same weights); changed settings delete the old run and train anew."""
    import demo

    shards = write_tar(tmp_path / "train.tar", [m for i in range(6) for m in _sample_members(f"g{i}")])
    run_dir = str(tmp_path / "out" / "sft")
    overrides = ["--data.train", shards, "--data.val", shards, "--data.num_workers", "0", "--data.batch_size", "2",
                 "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1"]
    export = demo.train("conf/sft.yaml", run_dir, overrides, inputs=[shards])
    weights = demo.file_digest([export])
    events = glob.glob(os.path.join(run_dir, "events.out.tfevents*"))
    assert len(events) == 1 and os.path.exists(os.path.join(run_dir, "checkpoints", "last.ckpt"))

    assert demo.train("conf/sft.yaml", run_dir, overrides, inputs=[shards]) == export  # not refused: resumed
    assert demo.file_digest([export]) == weights  # the finished run re-exported the same model
    assert len(_scalars(run_dir, "train/loss")) == 2  # no step trained twice

    settings = json.load(open(os.path.join(run_dir, demo.STAGE_FILE)))
    assert demo.prepare_run_dir(run_dir, settings) == "resume"
    assert demo.prepare_run_dir(run_dir, {**settings, "overrides": overrides[:-1] + ["4"]}) == "restart"
    assert os.listdir(run_dir) == [demo.STAGE_FILE]  # the old run is gone: no checkpoint of other settings resumes
    assert demo.prepare_run_dir(str(tmp_path / "out" / "dpo"), settings) == "new"
