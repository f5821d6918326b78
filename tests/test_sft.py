"""SFT with the real Trainer on real shards: the tiny model learns the shapes world; parameters behave."""

import lightning as L
import torch

from vlalign.backbone import BackboneConfig
from vlalign.data.module import ShardDataModule
from vlalign.optim import OptimConfig
from vlalign.sft import SFTModule


def _trainer(steps, **kw):
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=4, **kw)


def test_sft_learns_the_shapes_world(shapes_dir, tmp_path):
    torch.manual_seed(0)
    module = SFTModule(BackboneConfig(train_vision=True), OptimConfig(lr=2e-3, warmup_steps=10, schedule="constant"),
                       export_dir=str(tmp_path / "export"))
    dm = ShardDataModule(train=f"{shapes_dir}/sft/train-*.tar", val=f"{shapes_dir}/sft/val-*.tar", batch_size=16,
                         val_batch_size=16, num_workers=0, max_length=256)
    before = _trainer(1).validate(module, dm, verbose=False)[0]["val/loss"]
    trainer = _trainer(80)
    trainer.fit(module, dm)
    after = trainer.validate(module, dm, verbose=False)[0]["val/loss"]
    # from a uniform guess over the vocabulary (ln 512 = 6.2 nats) to the world's regularities; margin 2.5 nats
    assert before > 5.5
    assert after < before - 2.5, (before, after)
    assert (tmp_path / "export" / "merged" / "model.safetensors").exists()


def test_trainable_change_and_frozen_stay_bit_identical(shapes_dir):
    module = SFTModule(BackboneConfig(train_vision=False, train_projector=True, lora={"r": 4, "alpha": 8}),
                       OptimConfig(lr=1e-2))
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    dm = ShardDataModule(train=f"{shapes_dir}/sft/train-*.tar", val=None, batch_size=8, num_workers=0)
    _trainer(4).fit(module, dm)
    for n, p in module.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
