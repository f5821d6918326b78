"""Atomic checkpoints and exports, and resuming a run with ``--ckpt_path last``.

Writers are SIGKILLed at random moments while they write ``last.ckpt`` through ``AtomicCheckpointIO`` (also with the
system temp dir on another filesystem): the target must always load and equal one complete version, and the next
writer must clean up what the killed one left. Exports swap in whole directories. Through the real CLI, a stopped
SFT run resumes from its own ``runs/sft/checkpoints/last.ckpt`` at the saved step, logging into the same run
directory, and a fresh run over its checkpoints is refused. Under DeepSpeed (CPU processes, the test-only switches
of ``deepspeed_cpu``) a run killed mid-save resumes from the previous ``last.ckpt/`` directory.
"""

import multiprocessing as mp
import os
import random
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

from vlalign.checkpoint import (AtomicCheckpointIO, atomic_dir, export_backbone, remove_stale_temps, swap_in,
                                temp_path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 4_000_000  # float32 elements per tensor: two tensors, ~32 MB a checkpoint, so a kill often lands mid-write


def _version(v: int) -> dict:
    """A checkpoint dict shaped like Lightning's, whose every value says which version it is."""
    return {"global_step": v, "state_dict": {"a": torch.full((N,), float(v)), "b": torch.full((N,), -float(v))},
            "loops": {"step": torch.tensor(v)}}


def _writer(target: str, first: int, tmpdir):
    """Write versions first, first+1, ... to ``target`` forever (until killed)."""
    if tmpdir:
        import tempfile

        os.environ["TMPDIR"] = tmpdir
        tempfile.tempdir = None
    io = AtomicCheckpointIO()
    v = first
    while True:
        io.save_checkpoint(_version(v), target)
        v += 1


def _check_complete(target: str, started: set[int]) -> int:
    ckpt = AtomicCheckpointIO().load_checkpoint(target, weights_only=True)
    v = ckpt["global_step"]
    assert v in started, (v, started)
    assert torch.equal(ckpt["state_dict"]["a"], torch.full((N,), float(v)))
    assert torch.equal(ckpt["state_dict"]["b"], torch.full((N,), -float(v)))
    assert int(ckpt["loops"]["step"]) == v
    return v


def _strays(d) -> list[str]:
    return sorted(e for e in os.listdir(d) if e != "last.ckpt")


def _other_filesystem(tmp_path):
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        return None
    return shm


@pytest.mark.parametrize("system_tmp", ["same", "other_filesystem"])
def test_a_killed_writer_leaves_the_previous_checkpoint_and_no_strays(tmp_path, system_tmp):
    tmpdir = None
    if system_tmp == "other_filesystem":
        shm = _other_filesystem(tmp_path)
        if shm is None:
            pytest.skip("no writable /dev/shm on another filesystem")
        import tempfile

        tmpdir = tempfile.mkdtemp(dir=shm)
    ctx = mp.get_context("fork")  # the test process has torch imported: a fork starts a writer in milliseconds
    target = str(tmp_path / "ckpts" / "last.ckpt")
    rng = random.Random(0)
    started: set[int] = set()
    mid_write = 0
    try:
        for k in range(6):
            first = 1000 * k
            started.update(range(first, first + 1000))
            proc = ctx.Process(target=_writer, args=(target, first, tmpdir), daemon=True)
            proc.start()
            if k > 0:  # the new writer has cleaned up the killed one's temp file once its first write is done
                deadline = time.time() + 30
                while _check_complete(target, started) < first and time.time() < deadline:
                    time.sleep(0.01)
                assert _check_complete(target, started) >= first
                assert [e for e in _strays(target.rsplit("/", 1)[0]) if not e.endswith(f"-{proc.pid}")] == []
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            strays = _strays(tmp_path / "ckpts")
            mid_write += bool(strays)
            assert all(e == f".last.ckpt.tmp-{proc.pid}" for e in strays), strays
            if os.path.exists(target):
                _check_complete(target, started)
        assert mid_write >= 1, "no kill landed inside a write: the test proved nothing"
        remove_stale_temps(str(tmp_path / "ckpts"))
        assert _strays(tmp_path / "ckpts") == []
        _check_complete(target, started)
        if tmpdir:
            assert os.listdir(tmpdir) == []  # nothing was staged on the other filesystem
    finally:
        if tmpdir:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)


def test_nonfinite_weights_are_not_checkpointed(tmp_path):
    target = str(tmp_path / "last.ckpt")
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, target)
    bad = {"state_dict": {"w": torch.tensor([1.0, float("nan"), 2.0]), "n": torch.tensor([3])}, "global_step": 2}
    with pytest.raises(ValueError, match=r"NaN or inf \(w\)"):
        io.save_checkpoint(bad, target)
    assert io.load_checkpoint(target, weights_only=True)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_a_directory_swap_caught_between_its_renames_is_restored(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "w").write_text("old")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # what swap_in leaves when killed after renaming the old export away and before renaming the new one in
    os.rename(target, temp_path(str(target), "old", dead.pid))
    staged = tmp_path / f".merged.tmp-{dead.pid}"
    staged.mkdir()
    (staged / "w").write_text("half")
    remove_stale_temps(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["merged"] and (target / "w").read_text() == "old"

    with pytest.raises(RuntimeError):
        with atomic_dir(str(target)) as tmp:
            open(os.path.join(tmp, "w"), "w").write("new")
            raise RuntimeError("killed mid-export")
    assert sorted(os.listdir(tmp_path)) == ["merged"] and (target / "w").read_text() == "old"
    with atomic_dir(str(target)) as tmp:
        open(os.path.join(tmp, "w"), "w").write("new")
    assert sorted(os.listdir(tmp_path)) == ["merged"] and (target / "w").read_text() == "new"
    new = tmp_path / "staged"
    new.mkdir()
    swap_in(str(new), str(target))
    assert sorted(os.listdir(tmp_path)) == ["merged"] and os.listdir(target) == []


def test_export_is_swapped_in_whole_and_refuses_nan_weights(tmp_path, make_backbone):
    from safetensors.torch import load_file

    bb = make_backbone(lora={"r": 4})
    module = types.SimpleNamespace(backbone=bb, trainer=types.SimpleNamespace(global_rank=0))
    export_backbone(module, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter", "merged"]
    before = load_file(str(tmp_path / "merged" / "model.safetensors"))
    name, p = next((n, p) for n, p in bb.named_parameters() if p.requires_grad)
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"NaN or inf \\({name}"):
        export_backbone(module, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter", "merged"]
    after = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def _fit(tmp_path, shapes_dir, *extra):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "src/train.py", "fit", "--config", "conf/sft.yaml", "--trainer.enable_progress_bar", "false",
           # the session's shapes world, read as shards: "--data.shapes_dir" would rebuild it with the CLI's sizes
           "--data.train", f"{shapes_dir}/sft/train-*.tar", "--data.val", f"{shapes_dir}/sft/val-*.tar",
           "--data.num_workers", "1",
           "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
           "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(runs / "sft"),
           "--trainer.logger.init_args.save_dir", str(runs), "--model.init_args.export_dir", "null", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_ckpt_path_last_resumes_the_run_in_its_own_directory(tmp_path, shapes_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "sft"
    last = run / "checkpoints" / "last.ckpt"
    res = _fit(tmp_path, shapes_dir, "--trainer.max_steps", "4")  # a 6-step run, stopped after 4
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert torch.load(last, weights_only=False)["global_step"] == 4
    assert not list(run.glob("version_*"))

    res = _fit(tmp_path, shapes_dir, "--trainer.max_steps", "6")  # forgot --ckpt_path: refused, nothing touched
    assert res.returncode != 0 and "already holds checkpoints" in res.stderr and "--ckpt_path last" in res.stderr
    assert torch.load(last, weights_only=False)["global_step"] == 4

    res = _fit(tmp_path, shapes_dir, "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert f"Restoring states from the checkpoint path at {last}" in res.stdout + res.stderr
    assert torch.load(last, weights_only=False)["global_step"] == 6
    events = sorted(run.glob("events.out.tfevents*"), key=os.path.getmtime)
    assert len(events) == 2 and not list(run.glob("version_*"))
    steps = []
    for path in events:
        ea = EventAccumulator(str(path))
        ea.Reload()
        steps.append([e.step for e in ea.Scalars("train/loss")])
    assert max(steps[0]) < 4 <= min(steps[1]) and max(steps[1]) == 5, steps  # the second run continued at step 4
    assert [e for e in os.listdir(run / "checkpoints") if e.startswith(".")] == []


DS_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch, lightning as L
from torch import nn
from lightning.pytorch.callbacks import ModelCheckpoint
from deepspeed_cpu import CPUDeepSpeedStrategy
from vlalign.checkpoint import AtomicDeepSpeedStrategy

class CPUAtomicDeepSpeed(AtomicDeepSpeedStrategy):  # the test-only CPU switches of deepspeed_cpu, atomic saving
    setup_environment = CPUDeepSpeedStrategy.setup_environment
    setup_distributed = CPUDeepSpeedStrategy.setup_distributed
    root_device = CPUDeepSpeedStrategy.root_device
    _get_process_group_backend = CPUDeepSpeedStrategy._get_process_group_backend

class Square(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(1024, 1024)  # 4 MB of weights, 16 MB with fp32 Adam states: a save takes a while
    def training_step(self, batch, i):
        return self.w(batch).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(4096, 1024), batch_size=4)

out, steps, ckpt = sys.argv[1], int(sys.argv[2]), (sys.argv[3] if len(sys.argv) > 3 else None)
L.seed_everything(0)
trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, strategy=CPUAtomicDeepSpeed(stage=2),
                    logger=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True, save_top_k=0)])
trainer.fit(Square(), ckpt_path=ckpt)
print("GLOBAL_STEP", trainer.global_step, flush=True)
"""


def test_deepspeed_checkpoint_directories_are_swapped_in_whole(tmp_path):
    script = tmp_path / "ds.py"
    script.write_text(DS_SCRIPT.format(tests=os.path.join(ROOT, "tests")))
    out = tmp_path / "checkpoints"
    with socket.socket() as s:  # a free port: two test runs may share the machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(out), "100000"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-4000:]
    while not any(e.startswith(".last.ckpt.tmp-") for e in os.listdir(out)) and time.time() < deadline:
        pass  # kill while the next save is being written
    proc.kill()
    proc.wait()
    proc.stderr.close()
    strays = sorted(set(os.listdir(out)) - {"last.ckpt"})
    assert (out / "last.ckpt").is_dir() and strays == [f".last.ckpt.tmp-{proc.pid}"], strays  # killed mid-save
    saved = torch.load(out / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
    step = saved["global_step"]

    res = subprocess.run([sys.executable, str(script), str(out), str(step + 2), "last"], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"GLOBAL_STEP {step + 2}" in res.stdout and "Restored all states" in res.stderr
    assert sorted(os.listdir(out)) == ["last.ckpt"]  # the killed writer's staging directory is gone
