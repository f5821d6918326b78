"""The streaming DataModule: formats, worker splitting, determinism, resume positions, truncation.

Exact resume across workers, layouts and the real Trainer: ``test_resume.py``."""

import pytest
from PIL import Image

from vlalign.data.module import ShardDataModule
from vlalign.data.shards import ShardWriter


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    with ShardWriter(str(d / "s-%03d.tar"), max_count=10) as w:
        for i in range(40):
            w.write({"kind": "preference", "id": f"p{i}", "prompt": "What is it?", "chosen": f"Shape number {i}.",
                     "rejected": "Nothing at all here."}, [Image.new("RGB", (48, 48), (i * 5, 0, 0))])
    return str(d / "s-*.tar")


def _ids(dm):
    return [i for b in dm.train_dataloader() for i in b["ids"]]


def test_every_sample_once_across_workers(shards, tiny_processor_backbone):
    dm = ShardDataModule(train=shards, val=None, batch_size=4, num_workers=2, shuffle_buffer=8)
    dm.attach(tiny_processor_backbone, {"format": "sft"})
    ids = _ids(dm)
    assert sorted(ids) == sorted(f"p{i}" for i in range(40))
    assert ids == _ids(dm)  # deterministic for a seed and epoch


def test_pair_batches_and_prompt_batches(shards, tiny_processor_backbone):
    bb = tiny_processor_backbone
    dm = ShardDataModule(train=shards, val=None, batch_size=4, num_workers=0)
    dm.attach(bb, {"format": "pairs", "layout": "packed", "num_responses": 2})
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape[0] == 4 and b["targets"].shape[0] == 8 and b["pixel_values"].shape[0] == 4
    assert (b["input_ids"] == bb.image_token_id).sum() == 4 * bb.num_image_tokens  # the image once per pair
    dm.attach(bb, {"format": "prompts"})
    b = next(iter(dm.train_dataloader()))
    assert (b["attention_mask"][:, -1] == 1).all()  # left padded
    assert b["records"][0]["answer"].startswith("Shape number")


def test_resume_skips_what_was_consumed(shards, tiny_processor_backbone):
    dm = ShardDataModule(train=shards, val=None, batch_size=4, num_workers=0, shuffle_buffer=8)
    dm.attach(tiny_processor_backbone, {"format": "sft"})
    full = [b["ids"] for b in dm.train_dataloader()]
    # consume three batches as the trainer would, then checkpoint
    for b in list(dm.train_dataloader())[:3]:
        dm.on_before_batch_transfer(b, 0)
    state = dm.state_dict()
    assert state["ranks"][0]["readers"] == {0: {"examples": 12, "done": False}}
    assert state["ranks"][0]["last_reader"] == 0 and state["layout"]["batch_size"] == 4
    fresh = ShardDataModule(train=shards, val=None, batch_size=4, num_workers=0, shuffle_buffer=8)
    fresh.attach(tiny_processor_backbone, {"format": "sft"})
    fresh.load_state_dict(state)
    rest = [b["ids"] for b in fresh.train_dataloader()]
    assert rest == full[3:]
    # the restored position applies once; the next epoch starts from the beginning
    assert [b["ids"] for b in fresh.train_dataloader()] == full


def test_truncation_and_too_long_prompts_are_counted(shards, tiny_processor_backbone):
    dm = ShardDataModule(train=shards, val=None, batch_size=64, num_workers=0, max_length=30)
    dm.attach(tiny_processor_backbone, {"format": "pairs", "layout": "packed", "num_responses": 2})
    batches = list(dm.train_dataloader())
    assert batches == []  # only an accounting item, which the loader counts and never yields
    assert dm.skipped == {"too_long": 40}
    dm = ShardDataModule(train=shards, val=None, batch_size=64, num_workers=0, max_length=52)
    dm.attach(tiny_processor_backbone, {"format": "pairs", "layout": "packed", "num_responses": 2})
    b = next(iter(dm.train_dataloader()))
    assert int(b["prompt_lengths"].max() + b["response_lengths"].max()) <= 52


def test_epoch_samples_gives_equal_lengths(shards, tiny_processor_backbone):
    dm = ShardDataModule(train=shards, val=None, batch_size=4, num_workers=0, epoch_samples=100)
    dm.attach(tiny_processor_backbone, {"format": "sft"})
    assert len(_ids(dm)) == 100
