"""RewardModule on the tiny model and real shards: what trains, packed == plain, export round trip, k = 3."""

import lightning as L
import pytest
import torch

from vlalign.backbone import BackboneConfig, LoraSpec
from vlalign.data.module import ShardDataModule
from vlalign.optim import OptimConfig
from vlalign.reward import RewardModule, RewardScorer, pair_rewards


@pytest.fixture(scope="module")
def base(tmp_path_factory, make_backbone):
    """A tiny model exported as a checkpoint directory, standing in for an SFT model."""
    out = tmp_path_factory.mktemp("reward") / "base"
    make_backbone().export_merged(str(out))
    return str(out)


def _module(base, **kw):
    cfg = BackboneConfig(checkpoint=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), train_vision=False,
                         train_projector=False)
    return RewardModule(cfg, OptimConfig(lr=1e-2, head_lr=1e-2, schedule="constant"), **kw)


def _data(shapes_dir, batch_size=4, val=True):
    return ShardDataModule(train=f"{shapes_dir}/preference/train-*.tar",
                           val=f"{shapes_dir}/preference/val-*.tar" if val else None,
                           batch_size=batch_size, num_workers=0, shuffle_buffer=0)


def _batch(module, shapes_dir, layout, k=2, n=4):
    dm = _data(shapes_dir, n, val=False)
    dm.attach(module.backbone, {"format": "pairs", "layout": layout, "num_responses": k})
    batch = next(iter(dm.train_dataloader()))
    batch.pop("stream", None), batch.pop("skipped", None)
    return batch


@pytest.fixture(scope="module")
def trained(base, shapes_dir, tmp_path_factory):
    """A reward model trained for a few dozen steps with the real Trainer and exported."""
    torch.manual_seed(0)
    export = str(tmp_path_factory.mktemp("reward") / "export")
    m = _module(base, export_dir=export)
    m.configure_model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                        val_check_interval=30, check_val_every_n_epoch=None)
    trainer.fit(m, _data(shapes_dir))
    return m, before, trainable, export, trainer


def test_trainable_change_and_frozen_do_not(trained):
    m, before, trainable, _, trainer = trained
    assert "head.weight" in trainable and any("lora_" in n for n in trainable)
    assert all(n == "head.weight" or "lora_" in n for n in trainable)
    for n, p in m.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    for key in ("train/loss", "val/accuracy", "val/loss"):
        assert torch.isfinite(trainer.callback_metrics[key]), key


def test_packed_and_plain_give_the_same_rewards(trained, shapes_dir):
    m = trained[0]
    m.eval()
    with torch.no_grad():
        packed = pair_rewards(m.backbone, m.head, _batch(m, shapes_dir, "packed"))
        plain = pair_rewards(m.backbone, m.head, _batch(m, shapes_dir, "plain"))
    assert packed.shape == (4, 2)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_export_loads_and_scores_like_the_module(trained, shapes_dir):
    m, _, _, export, _ = trained
    m.eval()
    scorer = RewardScorer.load(export)
    assert not any(p.requires_grad for p in scorer.parameters())
    scorer.train()
    assert not scorer.training  # a frozen judge stays in eval mode
    batch = _batch(m, shapes_dir, "plain")
    with torch.no_grad():
        expected = pair_rewards(m.backbone, m.head, batch)
    torch.testing.assert_close(scorer.score_batch(batch), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected[:, 0], expected[:, 1])  # the head is not constant


def test_plackett_luce_on_three_ranked_candidates(base, shapes_dir):
    m = _module(base, loss="plackett_luce", num_responses=3)
    m.configure_model()
    batch = _batch(m, shapes_dir, "packed", k=3)
    rewards = pair_rewards(m.backbone, m.head, batch)
    assert rewards.shape == (4, 3)
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(m, _data(shapes_dir, val=False))
    assert torch.isfinite(torch.tensor(float(m.trainer.callback_metrics["train/loss"])))


def test_bradley_terry_needs_pairs(base):
    with pytest.raises(ValueError, match="plackett_luce"):
        _module(base, loss="bradley_terry", num_responses=3)
