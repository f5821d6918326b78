"""DPOModule on the tiny model: parameters, the three references, packed == plain, every loss runs."""

import lightning as L
import pytest
import torch

from vlalign.backbone import BackboneConfig, LoraSpec
from vlalign.data.module import ShardDataModule
from vlalign.dpo import DPOModule
from vlalign.losses import PREFERENCE_LOSSES
from vlalign.optim import OptimConfig


@pytest.fixture(scope="module")
def base(tmp_path_factory, make_backbone):
    """A tiny model exported as a checkpoint directory, standing in for an SFT model."""
    out = tmp_path_factory.mktemp("dpo") / "base"
    make_backbone().export_merged(str(out))
    return str(out)


def _module(base, **kw):
    lora = kw.pop("lora", LoraSpec(r=4, alpha=8, dropout=0.0))
    cfg = BackboneConfig(checkpoint=base, lora=lora, train_vision=False, train_projector=kw.pop("train_projector", False))
    m = DPOModule(cfg, OptimConfig(lr=1e-2, schedule="constant"), **kw)
    m.configure_model()
    return m


def _batch(module, shapes_dir, layout="packed", k=2, n=4):
    dm = ShardDataModule(train=f"{shapes_dir}/preference/train-*.tar", val=None, batch_size=n, num_workers=0,
                         shuffle_buffer=0)
    dm.attach(module.backbone, {"format": "pairs", "layout": layout, "num_responses": k})
    return next(iter(dm.train_dataloader()))


def _fit(module, shapes_dir, steps=4, k=2):
    dm = ShardDataModule(train=f"{shapes_dir}/preference/train-*.tar", val=None, batch_size=4, num_workers=0)
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, dm)


@pytest.mark.parametrize("reference", ["adapter", "copy"])
def test_trainable_change_frozen_and_reference_do_not(base, shapes_dir, reference):
    torch.manual_seed(0)
    m = _module(base, reference=reference)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _fit(m, shapes_dir)
    for n, p in m.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    if reference == "copy":
        assert any(n.startswith("reference.backbone.") for n in before)


def test_precomputed_reference_gives_the_adapter_loss(base, shapes_dir):
    m = _module(base, reference="adapter")
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a policy that differs from its reference
    m.eval()
    batch = _batch(m, shapes_dir)
    with torch.no_grad():
        loss_a, metrics_a = m.step(batch)
        ref = m.reference_logps(batch)
    pre = DPOModule(m.backbone.config, reference="precomputed")
    pre.backbone = m.backbone
    batch_c = dict(batch, ref_logps_sum=ref.sum, ref_logps_mean=ref.mean)
    with torch.no_grad():
        loss_c, metrics_c = pre.step(batch_c)
    torch.testing.assert_close(loss_c, loss_a, rtol=1e-6, atol=1e-6)
    assert loss_a.item() != pytest.approx(0.6931, abs=1e-4)  # the adapter made a difference


def test_loss_is_log2_when_policy_equals_reference(base, shapes_dir):
    m = _module(base, reference="adapter")  # LoRA B = 0: policy == reference
    m.eval()
    with torch.no_grad():
        loss, metrics = m.step(_batch(m, shapes_dir))
    assert loss.item() == pytest.approx(0.693147, abs=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)


def test_packed_and_plain_give_the_same_loss(base, shapes_dir):
    m = _module(base, reference="adapter")
    for n, p in m.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    m.eval()
    with torch.no_grad():
        packed, _ = m.step(_batch(m, shapes_dir, "packed"))
        plain, _ = m.step(_batch(m, shapes_dir, "plain"))
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", sorted(set(PREFERENCE_LOSSES) - {"plackett_luce"}))
def test_every_pairwise_loss_trains(base, shapes_dir, loss):
    params = {"conservative": {"label_smoothing": 0.1}, "rpo": {"alpha": 1.0}}.get(loss, {})
    m = _module(base, loss=loss, loss_params=params, logp="mean" if loss == "ipo" else "sum")
    _fit(m, shapes_dir, steps=2)


def test_plackett_luce_on_ranked_candidates(base, shapes_dir):
    m = _module(base, loss="plackett_luce", num_responses=3)
    batch = _batch(m, shapes_dir, k=3)
    assert batch["targets"].shape[0] == 3 * batch["input_ids"].shape[0]
    loss, _ = m.step(batch)
    assert torch.isfinite(loss)


def test_noisy_rejected_scoring_runs_and_differs(base, shapes_dir):
    m = _module(base, rejected_scoring="noisy")
    std = _module(base)
    std.backbone = m.backbone
    m.eval()
    batch = _batch(m, shapes_dir)
    with torch.no_grad():
        noisy = m.policy_logps(batch).sum
        plain = std.policy_logps(batch).sum
    torch.testing.assert_close(noisy[:, 0], plain[:, 0])          # chosen scored as usual
    assert not torch.allclose(noisy[:, 1], plain[:, 1])          # rejected scored by the model's own guesses


def test_bad_configuration_is_refused(base):
    lora = LoraSpec(r=2)
    with pytest.raises(ValueError, match="adapter"):
        DPOModule(BackboneConfig(checkpoint=base), reference="adapter")
    with pytest.raises(ValueError, match="unknown preference loss"):
        DPOModule(BackboneConfig(checkpoint=base, lora=lora), loss="nope")
    with pytest.raises(ValueError, match="needs a reference"):
        DPOModule(BackboneConfig(checkpoint=base, lora=lora), loss="sigmoid", reference="none")
    with pytest.raises(ValueError, match="logp 'mean'"):
        DPOModule(BackboneConfig(checkpoint=base, lora=lora), loss="simpo", logp="mean")
    with pytest.raises(ValueError, match="num_responses=3"):
        DPOModule(BackboneConfig(checkpoint=base, lora=lora), loss="sigmoid", num_responses=3)
    with pytest.raises(ValueError, match="beta"):
        DPOModule(BackboneConfig(checkpoint=base, lora=lora), beta=0.0)


def test_reference_free_losses_run_no_reference(base, shapes_dir):
    """SimPO on a fully fine-tuned policy: no LoRA to disable and no copy built; the step never asks for a reference
    (a ``none`` reference raises if asked)."""
    m = _module(base, loss="simpo", lora=LoraSpec(r=0), beta=2.0)
    assert m.reference.mode == "none" and m.reference.backbone is None
    loss, metrics = m.step(_batch(m, shapes_dir))
    assert torch.isfinite(loss) and "rewards/margins" in metrics
    with pytest.raises(RuntimeError, match="without a reference"):
        m.reference.logps(m.backbone, _batch(m, shapes_dir))


def test_mixed_preference_optimisation_trains_and_logs_each_term(base, shapes_dir):
    m = _module(base, loss={"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0})
    _fit(m, shapes_dir, steps=3)
    metrics = m.trainer.callback_metrics
    for term in ("sigmoid", "bco_pair", "sft"):
        assert torch.isfinite(metrics[f"train/loss/{term}"])
    count, mean = m.reward_stats.tolist()
    assert count == 3 and mean != 0.0  # BCO's running reward mean moved with training
