"""PPOModule on the tiny model and the shapes world's prompts: what trains, what stays frozen, the critic's start,
finite metrics, the critic warm-up, the reward window in checkpoints, and the tokenizer check."""

import math

import lightning as L
import pytest
import torch

from vlalign.backbone import Backbone, BackboneConfig, LoraSpec, TinySpec
from vlalign.data.module import ShardDataModule
from vlalign.generation import Sampling
from vlalign.optim import OptimConfig
from vlalign.ppo import PPOConfig, PPOModule, check_same_tokenizer

METRICS = ("reward_mean", "reward_normalised_mean", "kl", "policy_loss", "value_loss", "clip_fraction",
           "value_clip_fraction", "approx_kl", "entropy", "response_length", "advantage_mean", "advantage_std",
           "returns_mean")


@pytest.fixture(scope="module")
def models(reward_export):
    return reward_export


def _module(models, reference="adapter", **ppo):
    base, reward = models
    cfg = BackboneConfig(checkpoint=base, lora=LoraSpec(r=4, alpha=8, dropout=0.0), train_vision=False,
                         train_projector=False)
    ppo = PPOConfig(**{"epochs": 2, "minibatch_size": 2, "reward_scale": 1.0, **ppo})
    return PPOModule(cfg, reward, OptimConfig(lr=1e-2, head_lr=1e-2, schedule="constant"), ppo,
                     Sampling(max_new_tokens=8, do_sample=True, temperature=0.75, top_p=0.95, top_k=50),
                     critic_lora=LoraSpec(r=4, alpha=8, dropout=0.0), reference=reference, sample_every=1)


def _fit(module, shapes_dir, max_steps, val=True):
    dm = ShardDataModule(train=f"{shapes_dir}/prompts/train-*.tar",
                         val=f"{shapes_dir}/prompts/test-*.tar" if val else None, batch_size=4, num_workers=0,
                         shuffle_buffer=0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    return trainer


@pytest.mark.parametrize("reference", ["adapter", "copy"])
def test_policy_and_critic_train_and_the_frozen_do_not(models, shapes_dir, reference):
    torch.manual_seed(0)
    m = _module(models, reference=reference)
    m.configure_model()
    torch.testing.assert_close(m.critic_head.weight, m.reward.head.weight, rtol=0, atol=0)  # V starts as r_phi
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.") and "lora_" in n for n in trainable)
    assert any(n.startswith("critic.") and "lora_" in n for n in trainable) and "critic_head.weight" in trainable
    assert not any(n.startswith(("reward.", "reference.")) for n in trainable)
    trainer = _fit(m, shapes_dir, max_steps=8)  # 2 rollouts x 2 epochs x 2 minibatches
    assert m.rollouts == 2 and trainer.global_step == 8
    for n, p in m.named_parameters():
        if n in trainable:
            if "lora_A" not in n:  # LoRA A gets no gradient while B is still zero at the first step
                assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters() if n.startswith("backbone.") and "lora_A" in n)
    for name in METRICS:
        value = float(trainer.callback_metrics[f"train/{name}"])
        assert math.isfinite(value), name
    assert 1 <= float(trainer.callback_metrics["train/response_length"]) <= 8
    assert math.isfinite(float(trainer.callback_metrics["val/reward_mean"]))
    assert len(m.scores) == 8  # the window holds every score so far


def test_critic_warmup_trains_the_critic_only(models, shapes_dir):
    torch.manual_seed(0)
    m = _module(models, critic_warmup_steps=1, epochs=1, minibatch_size=None)
    m.configure_model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    _fit(m, shapes_dir, max_steps=1, val=False)
    policy = [n for n, p in m.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    assert policy and all(torch.equal(dict(m.named_parameters())[n], before[n]) for n in policy)
    assert not torch.equal(m.critic_head.weight, before["critic_head.weight"])


def test_reward_window_is_kept_in_checkpoints(models):
    m = _module(models, reward_window=5, reward_scale=10.0, reward_clip=3.0)
    norm = m.normalise(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]))
    assert m.scores == [3.0, 4.0, 5.0, 6.0, 7.0]  # the 5 most recent
    assert norm.abs().max().item() <= 3.0 + 1e-6
    m.rollouts = 7
    checkpoint = {"state_dict": {}}
    m.on_save_checkpoint(checkpoint)
    other = _module(models)
    other.on_load_checkpoint(checkpoint)
    assert other.scores == m.scores and other.rollouts == 7


def test_a_reward_model_with_another_tokenizer_is_refused(models):
    policy = Backbone(BackboneConfig())
    other = Backbone(BackboneConfig(tiny=TinySpec(vocab_size=400)))
    check_same_tokenizer(policy, Backbone(BackboneConfig()))
    with pytest.raises(ValueError, match="tokenizer"):
        check_same_tokenizer(policy, other)


def test_bad_configuration_is_refused(models):
    base, reward = models
    with pytest.raises(ValueError, match="adapter"):
        PPOModule(BackboneConfig(checkpoint=base), reward, reference="adapter")
