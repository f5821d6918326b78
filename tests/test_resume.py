"""Exact resume of the data stream and of training; epochs reshuffle; skips are counted exactly.

DataModule level: a run interrupted after any batch (odd counts, across the epoch boundary, with 0, 1 and 2
workers, with Lightning's one-batch prefetch) and resumed from ``state_dict`` sees the same batches in the same
order as the uninterrupted run, with the same skip counts; a changed layout is refused by name. Trainer level: the
per-step losses of a run resumed from a mid-epoch and from an end-of-validation checkpoint equal the uninterrupted
run's (float32, CPU; LoRA dropout on, so the RNG state matters too).
"""

import io
import json

import lightning as L
import pytest
from PIL import Image
from raw_tar import write_tar

from vlalign.data.module import ShardDataModule


def _sft(i, answer=None):
    return {"kind": "sft", "id": f"s{i}", "conversation": [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": answer or f"Shape number {i}."}]}


def _png(i):
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (i * 7 % 256, 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _good(i):
    return [(f"k{i}.json", json.dumps(_sft(i)).encode()), (f"k{i}.png", _png(i))]


# Bad samples of three reasons, placed first, in the middle and last in their shards.
BAD = {"bad_image": lambda k: [(f"{k}.json", json.dumps(_sft(99)).encode()), (f"{k}.png", b"\x89PNG not really")],
       "no_json": lambda k: [(f"{k}.png", _png(1))],
       "bad_json": lambda k: [(f"{k}.json", b'{"kind": "sft", "id": '), (f"{k}.png", _png(2))]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Four shards: 7, 6 and 4 good samples with bad ones between and after them, and one with bad samples only."""
    d = tmp_path_factory.mktemp("resume")
    layout = [[("bad_image", "b0"), 0, 1, 2, ("no_json", "b1"), 3, 4, 5, 6, ("bad_json", "b2")],
              [7, 8, ("bad_image", "b3"), 9, 10, 11, 12],
              [("no_json", "b4"), ("bad_json", "b5"), ("bad_image", "b6")],
              [13, 14, 15, 16, ("no_json", "b7"), ("bad_image", "b8")]]
    for s, items in enumerate(layout):
        members = []
        for it in items:
            members += BAD[it[0]](it[1]) if isinstance(it, tuple) else _good(it)
        write_tar(d / f"r-{s:03d}.tar", members)
    (d / "e-000.tar").write_bytes(b"")  # unreadable: alone in a reader's share, that reader yields no batch
    return str(d / "r-*.tar")


GOOD = 17
EXPECTED_SKIPS = {"bad_image": 4, "no_json": 3, "bad_json": 2}


def _dm(shards, backbone, **kw):
    args = dict(train=shards, val=None, batch_size=3, num_workers=0, shuffle_buffer=4, max_length=64)
    args.update(kw)
    dm = ShardDataModule(**args)
    dm.attach(backbone, {"format": "sft"})
    return dm


def _take(dm, loader, stop=None):
    """Ids of the batches the loop takes (as Lightning does: the next batch is fetched before one is taken);
    stops after ``stop`` batches (None: the whole pass)."""
    out = []
    it = iter(loader)
    nxt = next(it, None)
    while nxt is not None and (stop is None or len(out) < stop):
        b, nxt = nxt, next(it, None)
        dm.on_before_batch_transfer(b, 0)
        out.append(list(b["ids"]))
    return out


def _run(shards, backbone, epochs=2, **kw):
    dm = _dm(shards, backbone, **kw)
    loader = dm.train_dataloader()
    return [_take(dm, loader) for _ in range(epochs)], dm


def test_epochs_reshuffle_reproducibly(shards, tiny_processor_backbone):
    (e0, e1), dm = _run(shards, tiny_processor_backbone, num_workers=2)
    flat0, flat1 = [i for b in e0 for i in b], [i for b in e1 for i in b]
    assert sorted(flat0) == sorted(flat1) == sorted(f"s{i}" for i in range(GOOD))
    assert flat0 != flat1
    assert _run(shards, tiny_processor_backbone, num_workers=2)[0] == [e0, e1]
    assert dm.skipped == {k: 2 * v for k, v in EXPECTED_SKIPS.items()}  # every error, each epoch, exactly once


@pytest.mark.parametrize("workers,variant", [(0, None), (1, None), (2, None), (2, "epoch_samples"),
                                             (2, "reader_without_batches")])
def test_resume_gives_the_same_batches(shards, tiny_processor_backbone, workers, variant):
    kw = {"num_workers": workers}
    if variant == "epoch_samples":  # 25 examples an epoch, cycling over the shards
        kw["epoch_samples"] = 25
    if variant == "reader_without_batches":  # one worker reads the unreadable shard only
        kw["train"] = [shards.replace("r-*", "r-000"), shards.replace("r-*", "e-000")]
    (e0, e1), ref = _run(shards, tiny_processor_backbone, **kw)
    full = e0 + e1
    if variant == "reader_without_batches":
        assert ref.skipped["shard_unreadable"] == 2
    for cut in (1, 2, 3, len(e0) - 1, len(e0), len(e0) + 1):  # odd and even, the epoch boundary, into epoch 1
        dm = _dm(shards, tiny_processor_backbone, **kw)
        loader = dm.train_dataloader()
        first = _take(dm, loader, min(cut, len(e0)))
        if cut > len(e0):
            first += _take(dm, loader, cut - len(e0))
        state = dm.state_dict()
        resumed = _dm(shards, tiny_processor_backbone, **kw)
        resumed.load_state_dict(state)
        loader = resumed.train_dataloader()
        rest = []
        while len(first) + len(rest) < len(full):  # a pass after an epoch's last batch may be empty
            rest += _take(resumed, loader)
        assert first + rest == full, (kw, cut)
        assert resumed.skipped == ref.skipped, (kw, cut)


def test_batch_size_may_change_other_layout_changes_are_refused(shards, tiny_processor_backbone, monkeypatch):
    (e0, _), _ = _run(shards, tiny_processor_backbone, epochs=2, num_workers=0)
    dm = _dm(shards, tiny_processor_backbone, num_workers=0)
    first = _take(dm, dm.train_dataloader(), 2)
    state = dm.state_dict()
    # num_workers 0 and 1 are the same layout (one reader per rank); another batch size continues per example
    for kw in ({"num_workers": 1}, {"batch_size": 2}):
        resumed = _dm(shards, tiny_processor_backbone, **kw)
        resumed.load_state_dict(state)
        rest = _take(resumed, resumed.train_dataloader())
        assert [i for b in first + rest for i in b] == [i for b in e0 for i in b], kw
    for kw, named in (({"num_workers": 2}, "data.num_workers was 1 and is 2"), ({"seed": 1}, "data.seed"),
                      ({"shuffle_buffer": 8}, "data.shuffle_buffer"), ({"max_length": 80}, "data.max_length"),
                      ({"train": shards.replace("r-*", "r-00[012]")}, "data.train")):
        resumed = _dm(shards, tiny_processor_backbone, **kw)
        resumed.load_state_dict(state)
        with pytest.raises(ValueError, match=named):
            resumed.train_dataloader()
    monkeypatch.setenv("WORLD_SIZE", "2")  # read when no process group exists
    resumed = _dm(shards, tiny_processor_backbone)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match=r"number of processes \(trainer.devices x trainer.num_nodes\) was 1 and is 2"):
        resumed.train_dataloader()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="no per-rank stream position"):
        _dm(shards, tiny_processor_backbone).load_state_dict({"epoch": 0, "positions": {0: 3}})


@pytest.mark.parametrize("workers", [0, 2])
def test_skips_are_counted_exactly_in_train_and_val(shards, tiny_processor_backbone, workers, tmp_path):
    """Errors after a reader's last batch, a reader without any batch (a 0-byte shard next to a good one), a
    shard shared by more readers than shards: every good sample arrives once and every error is counted once."""
    write_tar(tmp_path / "a-000.tar", _good(0) + BAD["bad_json"]("x") + _good(1) + BAD["no_json"]("y"))
    (tmp_path / "a-001.tar").write_bytes(b"")
    for train, expected in ((str(tmp_path / "a-*.tar"), {"bad_json": 1, "no_json": 1, "shard_unreadable": 1}),
                            (str(tmp_path / "a-000.tar"), {"bad_json": 1, "no_json": 1})):
        dm = _dm(train, tiny_processor_backbone, num_workers=workers, val=train, batch_size=2)
        ids = [i for b in _take(dm, dm.train_dataloader()) for i in b]
        assert sorted(ids) == ["s0", "s1"] and dm.skipped == expected, (train, workers)
        for _ in range(2):  # per validation pass
            val = [i for b in _take(dm, dm.val_dataloader()) for i in b]
            assert sorted(val) == ["s0", "s1"] and dm.skipped_val == expected
        assert dm.skipped == expected  # validation skips are not training skips


class Losses(L.Callback):
    """step -> (epoch, sample ids, loss) of every training step."""

    def __init__(self):
        self.steps = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = (trainer.current_epoch, list(batch["ids"]), outputs["loss"].item())


def _fit(shards, tmp_path, workers, ckpt_path=None, checkpoints=False):
    from vlalign.backbone import BackboneConfig
    from vlalign.optim import OptimConfig
    from vlalign.sft import SFTModule

    L.seed_everything(0)
    module = SFTModule(BackboneConfig(lora={"r": 4, "alpha": 8, "dropout": 0.3}),
                       OptimConfig(lr=5e-3, warmup_steps=2, schedule="cosine"))
    dm = ShardDataModule(train=shards, val=shards, batch_size=3, val_batch_size=4, num_workers=workers,
                         shuffle_buffer=4, max_length=64)
    losses = Losses()
    callbacks = [losses]
    if checkpoints:  # mid-epoch (step 4: no validation there) and at the end of each validation (steps 3, 6, 9)
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks += [ModelCheckpoint(dirpath=tmp_path, filename="mid{step}", every_n_train_steps=4, save_top_k=-1),
                      ModelCheckpoint(dirpath=tmp_path, filename="val{step}", monitor="val/loss", save_top_k=-1)]
    trainer = L.Trainer(max_steps=10, max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=checkpoints, callbacks=callbacks,
                        val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=2,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, dm, ckpt_path=ckpt_path)  # torch's safe loader: the config dataclasses are allow-listed
    return losses.steps, dm


@pytest.mark.parametrize("workers", [0, 2])
def test_trainer_resume_continues_the_loss_curve(shards, tmp_path, workers):
    """6 batches an epoch (7 with 2 workers), 10 steps: the resumed runs cross an epoch boundary."""
    full, dm = _fit(shards, tmp_path, workers, checkpoints=True)
    assert sorted(full) == list(range(1, 11))
    epoch0 = [ids for epoch, ids, _ in full.values() if epoch == 0]
    epoch1 = [ids for epoch, ids, _ in full.values() if epoch == 1]
    assert len(epoch0) == (6 if workers == 0 else 7) and epoch1 != epoch0[:len(epoch1)]  # epochs reshuffle
    for name, step in (("mid", 4), ("val", 6)):
        path = tmp_path / f"{name}step={step}.ckpt"
        resumed, rdm = _fit(shards, tmp_path / f"again-{name}", workers, ckpt_path=str(path))
        assert sorted(resumed) == list(range(step + 1, 11)), name
        for s in resumed:
            assert resumed[s][:2] == full[s][:2], (name, s)  # same epoch, same samples in the same order
            assert abs(resumed[s][2] - full[s][2]) <= 1e-6, (name, s, resumed[s], full[s])
        assert rdm.skipped == dm.skipped


def _rank_main(rank, port, shards, backbone, out):
    """One of two gloo ranks: the uninterrupted ids, then an interruption after ``rank + 1`` batches (the ranks
    stop at different places), the gathered state, and the resumed ids."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        (full,), _ = _run(shards, backbone, epochs=1)
        dm = _dm(shards, backbone)
        first = _take(dm, dm.train_dataloader(), rank + 1)
        state = dm.state_dict()  # a collective: every rank's position goes into the checkpoint
        resumed = _dm(shards, backbone)
        resumed.load_state_dict(state)
        rest = _take(resumed, resumed.train_dataloader())
        out.put((rank, sorted(state["ranks"]), state["ranks"][1 - rank]["readers"], first + rest == full,
                 [i for b in full for i in b]))
    except BaseException as e:  # report, do not hang the other rank's test
        out.put((rank, repr(e)))
        raise
    finally:
        dist.destroy_process_group()


def test_every_rank_position_is_saved_and_resumed(shards, tiny_processor_backbone):
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # the backbone's processor is already loaded: a fork starts in milliseconds
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, port, shards, tiny_processor_backbone, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    assert all(len(v) == 4 for v in results.values()), results
    (ranks0, other0, ok0, ids0), (ranks1, other1, ok1, ids1) = results[0], results[1]
    assert ranks0 == ranks1 == [0, 1] and ok0 and ok1
    assert other1[0]["examples"] == 3 and other0[0]["examples"] == 6  # rank 0 took 1 batch of 3, rank 1 took 2
    assert not set(ids0) & set(ids1) and sorted(ids0 + ids1) == sorted(f"s{i}" for i in range(GOOD))
